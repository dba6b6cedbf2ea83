package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ars-dev/ars/agent/collector"
	"github.com/ars-dev/ars/agent/metrics"
	"github.com/ars-dev/ars/agent/replica"
	"github.com/ars-dev/ars/agent/status"
	"github.com/ars-dev/ars/agent/telemetry"
)

// goldenPath is the set of every metric arsd can export — name, labels,
// help — one per line. deploy/deploytest checks the dashboard and the
// alert rules against it, so renaming a metric breaks a test, not a
// dashboard.
const goldenPath = "../../deploy/metrics.golden"

// TestMetricSetGolden fixes the metric set: the control loop's collector,
// the eBPF telemetry's (served in-process or re-exported from the split
// collector), the collector client's own, and the role and replication
// metrics. Regenerate with ARS_UPDATE_GOLDEN=1 go test ./cmd/arsd -run Golden.
func TestMetricSetGolden(t *testing.T) {
	got := metrics.DescribeAll(metrics.NewCollector(&status.Board{}), &telemetry.Telemetry{},
		&collector.Client{}, &roleState{follower: &replica.Follower{}})
	if os.Getenv("ARS_UPDATE_GOLDEN") == "1" {
		if err := os.WriteFile(goldenPath, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(goldenPath)
	if err != nil {
		t.Fatal(err)
	}
	if got != string(want) {
		t.Fatalf("metric set changed; diff against %s:\n%s", filepath.Clean(goldenPath), lineDiff(string(want), got))
	}
	for _, l := range strings.Split(strings.TrimSpace(got), "\n") {
		name, rest, _ := strings.Cut(l, "{")
		_, help, _ := strings.Cut(rest, "} ")
		if !strings.HasPrefix(name, "ars_") || strings.TrimSpace(help) == "" {
			t.Errorf("metric line %q: want an ars_ name and a help text", l)
		}
	}
}

func lineDiff(a, b string) string {
	in := func(s string) map[string]bool {
		m := map[string]bool{}
		for _, l := range strings.Split(s, "\n") {
			m[l] = true
		}
		return m
	}
	ma, mb := in(a), in(b)
	var out []string
	for _, l := range strings.Split(a, "\n") {
		if !mb[l] {
			out = append(out, "- "+l)
		}
	}
	for _, l := range strings.Split(b, "\n") {
		if !ma[l] {
			out = append(out, "+ "+l)
		}
	}
	return strings.Join(out, "\n")
}
