package status

import (
	"strings"
	"testing"
)

func TestWriteTable(t *testing.T) {
	var b strings.Builder
	err := WriteTable(&b, []VM{
		{Name: "web", PID: 7, VCPUs: 2, UsageMillicores: 1250, AllocMillicores: 1500, RunqValid: true, RunqMeanNs: 1.5e6, RunqP99Ns: 4e6},
		{Name: "db", PID: 8, VCPUs: 1},
	})
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(b.String()), "\n")
	if len(lines) != 3 {
		t.Fatalf("%d lines:\n%s", len(lines), b.String())
	}
	for _, want := range []string{"web", "1.25", "1.50", "1.50ms", "4.00ms"} {
		if !strings.Contains(lines[1], want) {
			t.Errorf("row %q lacks %q", lines[1], want)
		}
	}
	if !strings.Contains(lines[2], "db") || !strings.Contains(lines[2], " -") {
		t.Errorf("row without telemetry %q", lines[2])
	}
}
