// Package deploytest checks the files under deploy/: the Prometheus rules
// and configuration (promtool), the alerts' unit tests, the Grafana
// dashboard against the metric names arsd defines, the Kubernetes
// manifests, the systemd unit (systemd-analyze verify) and `make install`.
// The real-Prometheus test against a running arsd is e2e/prometheus_test.go.
package deploytest

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"

	"github.com/ars-dev/ars/internal/testutil"
)

func deployDir(t *testing.T, sub ...string) string {
	return filepath.Join(append([]string{testutil.RepoRoot(t), "deploy"}, sub...)...)
}

func run(t *testing.T, dir, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func TestPromtoolCheckRules(t *testing.T) {
	promtool := testutil.RequireCommand(t, "promtool")
	out := run(t, deployDir(t, "prometheus"), promtool, "check", "rules", "ars-alerts.yml")
	t.Log(out)
}

func TestPromtoolCheckConfig(t *testing.T) {
	promtool := testutil.RequireCommand(t, "promtool")
	t.Log(run(t, deployDir(t, "prometheus"), promtool, "check", "config", "prometheus.yml"))
	// Debian's build has no Kubernetes SD: then only the YAML is checked.
	cmd := exec.Command(promtool, "check", "config", "prometheus-kubernetes.yml")
	cmd.Dir = deployDir(t, "prometheus")
	out, err := cmd.CombinedOutput()
	switch {
	case err == nil:
	case strings.Contains(string(out), "field kubernetes_sd_configs not found"):
		t.Logf("this promtool has no Kubernetes SD; prometheus-kubernetes.yml checked as YAML only")
		decodeAll(t, deployDir(t, "prometheus", "prometheus-kubernetes.yml"))
	default:
		t.Fatalf("promtool check config prometheus-kubernetes.yml: %v\n%s", err, out)
	}
}

func TestPromtoolTestRules(t *testing.T) {
	promtool := testutil.RequireCommand(t, "promtool")
	files, _ := filepath.Glob(deployDir(t, "prometheus", "*_test.yml"))
	if len(files) == 0 {
		t.Fatal("no deploy/prometheus/*_test.yml")
	}
	for _, f := range files {
		t.Log(run(t, deployDir(t, "prometheus"), promtool, "test", "rules", filepath.Base(f)))
	}
}

// TestAlertsCoverIssue: the alerts issue 10 asks for that arsd has metrics for.
func TestAlertsCoverIssue(t *testing.T) {
	var rf struct {
		Groups []struct {
			Rules []struct {
				Alert string `yaml:"alert"`
				Expr  string `yaml:"expr"`
			} `yaml:"rules"`
		} `yaml:"groups"`
	}
	b, err := os.ReadFile(deployDir(t, "prometheus", "ars-alerts.yml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(b, &rf); err != nil {
		t.Fatal(err)
	}
	exprs := map[string]string{}
	for _, g := range rf.Groups {
		for _, r := range g.Rules {
			exprs[r.Alert] = r.Expr
		}
	}
	for alert, metric := range map[string]string{
		"ARSSLAViolationRateHigh": "ars_vm_cpu_violation_ratio",
		"ARSPersistentThrottling": "ars_vm_cpu_throttled_periods",
		"ARSAgentDown":            "up",
		"ARSProbeDisabled":        "ars_bpf_probe_up",
		"ARSSLACannotBeMet":       "ars_vm_throttled",
		"ARSNoStandby":            "ars_replica_connected",
		"ARSJournalUnreadable":    "ars_journal_verify_ok",
		"ARSAuditLogUnverified":   "ars_audit_verify_ok",
	} {
		if !strings.Contains(exprs[alert], metric) {
			t.Errorf("alert %s: expr %q does not use %s", alert, exprs[alert], metric)
		}
	}
	known := KnownMetrics(t)
	for alert, e := range exprs {
		for _, m := range MetricNames(e) {
			if !known[m] {
				t.Errorf("alert %s uses %s, which arsd does not export", alert, m)
			}
		}
	}
}

// KnownMetrics is the set of series names arsd can expose: every name in
// deploy/metrics.golden (fixed by cmd/arsd's TestMetricSetGolden from the
// collectors themselves), each also with the _bucket/_sum/_count series
// of a histogram, plus the Go and process collectors' names the dashboard
// uses and Prometheus's own "up".
func KnownMetrics(t *testing.T) map[string]bool {
	t.Helper()
	known := map[string]bool{"up": true, "process_cpu_seconds_total": true,
		"process_resident_memory_bytes": true, "go_goroutines": true}
	b, err := os.ReadFile(deployDir(t, "metrics.golden"))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		name, _, ok := strings.Cut(l, "{")
		if !ok || !strings.HasPrefix(name, "ars_") {
			t.Fatalf("metrics.golden: bad line %q", l)
		}
		known[name] = true
		for _, s := range []string{"_bucket", "_sum", "_count"} {
			known[name+s] = true
		}
	}
	if len(known) < 40 {
		t.Fatalf("only %d metric names in metrics.golden", len(known))
	}
	return known
}

var (
	stringRE = regexp.MustCompile(`"(?:[^"\\]|\\.)*"`)
	braceRE  = regexp.MustCompile(`\{[^}]*\}`)
	byRE     = regexp.MustCompile(`\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)`)
	rangeRE  = regexp.MustCompile(`\[[^\]]*\]`)
	identRE  = regexp.MustCompile(`[a-zA-Z_:][a-zA-Z0-9_:]*`)
	promqlKW = map[string]bool{"and": true, "or": true, "unless": true, "bool": true, "offset": true,
		"inf": true, "nan": true, "Inf": true, "NaN": true}
)

// MetricNames returns the metric names in a PromQL expression: identifiers
// that are not functions, keywords, label names or Grafana variables.
func MetricNames(expr string) []string {
	e := stringRE.ReplaceAllString(expr, `""`)
	e = braceRE.ReplaceAllString(e, " ")
	e = byRE.ReplaceAllString(e, " ")
	e = rangeRE.ReplaceAllString(e, " ")
	e = regexp.MustCompile(`\$\w+`).ReplaceAllString(e, " ")
	seen := map[string]bool{}
	var names []string
	for _, loc := range identRE.FindAllStringIndex(e, -1) {
		id := e[loc[0]:loc[1]]
		if promqlKW[id] || (loc[0] > 0 && (e[loc[0]-1] >= '0' && e[loc[0]-1] <= '9' || e[loc[0]-1] == '.')) {
			continue // keyword, or the exponent/suffix of a number
		}
		rest := strings.TrimLeft(e[loc[1]:], " ")
		if strings.HasPrefix(rest, "(") {
			continue // function or aggregation
		}
		if !seen[id] {
			seen[id] = true
			names = append(names, id)
		}
	}
	sort.Strings(names)
	return names
}

// Dashboard is the part of a Grafana dashboard the tests read.
type Dashboard struct {
	UID        string  `json:"uid"`
	Title      string  `json:"title"`
	Panels     []Panel `json:"panels"`
	Templating struct {
		List []struct {
			Name  string `json:"name"`
			Query struct {
				Query string `json:"query"`
			} `json:"query"`
		} `json:"list"`
	} `json:"templating"`
}

// Panel is a dashboard panel (rows nest panels).
type Panel struct {
	Title      string `json:"title"`
	Type       string `json:"type"`
	Datasource *struct {
		UID string `json:"uid"`
	} `json:"datasource"`
	Targets []struct {
		Expr  string `json:"expr"`
		RefID string `json:"refId"`
	} `json:"targets"`
	Panels []Panel `json:"panels"`
}

// LoadDashboard reads deploy/grafana/ars-dashboard.json strictly.
func LoadDashboard(t *testing.T) Dashboard {
	t.Helper()
	b, err := os.ReadFile(deployDir(t, "grafana", "ars-dashboard.json"))
	if err != nil {
		t.Fatal(err)
	}
	if !json.Valid(b) {
		t.Fatal("ars-dashboard.json is not valid JSON")
	}
	var d Dashboard
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatal(err)
	}
	return d
}

// PanelQuery is one PromQL expression of a panel.
type PanelQuery struct{ Panel, Expr string }

// Queries returns every panel query of d.
func (d Dashboard) Queries() []PanelQuery {
	var qs []PanelQuery
	var walk func([]Panel)
	walk = func(ps []Panel) {
		for _, p := range ps {
			for _, tg := range p.Targets {
				qs = append(qs, PanelQuery{p.Title + "/" + tg.RefID, tg.Expr})
			}
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	return qs
}

func TestDashboardUsesOnlyExportedMetrics(t *testing.T) {
	d := LoadDashboard(t)
	if d.UID == "" || d.Title == "" {
		t.Fatal("dashboard has no uid or title")
	}
	vars := map[string]bool{}
	for _, v := range d.Templating.List {
		vars[v.Name] = true
	}
	if !vars["vm"] {
		t.Error("dashboard has no $vm variable")
	}
	known := KnownMetrics(t)
	qs := d.Queries()
	if len(qs) < 15 {
		t.Fatalf("only %d panel queries", len(qs))
	}
	used := map[string]bool{}
	check := func(where, expr string) {
		if strings.TrimSpace(expr) == "" {
			t.Errorf("%s: empty query", where)
		}
		if strings.Count(expr, "(") != strings.Count(expr, ")") || strings.Count(expr, "{") != strings.Count(expr, "}") {
			t.Errorf("%s: unbalanced brackets in %q", where, expr)
		}
		names := MetricNames(expr)
		if len(names) == 0 {
			t.Errorf("%s: no metric in %q", where, expr)
		}
		for _, m := range names {
			used[m] = true
			if !known[m] {
				t.Errorf("%s: %s is not a metric arsd exports (query %q)", where, m, expr)
			}
		}
	}
	for _, q := range qs {
		check(q.Panel, q.Expr)
	}
	for _, v := range d.Templating.List {
		q := strings.TrimSuffix(strings.TrimPrefix(v.Query.Query, "label_values("), ")")
		q, _, _ = strings.Cut(q, ", ")
		check("variable "+v.Name, q)
	}
	for _, m := range []string{"ars_vcpu_runqueue_delay_seconds_bucket", "ars_bpf_probe_up",
		"ars_vm_cpu_allocation_cores", "ars_vm_cpu_forecast_cores", "ars_ticks_total", "ars_actions_total",
		"ars_vm_block_io_latency_seconds_bucket", "ars_bpf_program_run_seconds_total"} {
		if !used[m] {
			t.Errorf("dashboard does not show %s", m)
		}
	}
	t.Logf("%d queries over %d metric names", len(qs), len(used))
}

func TestMetricNames(t *testing.T) {
	got := MetricNames(`histogram_quantile(0.99, sum by (vm, le) (rate(ars_x_bucket{vm=~"$vm", a="b(c)"}[$__rate_interval]))) / 2^20 and on (instance) up{job="arsd"} > 1e3`)
	if strings.Join(got, ",") != "ars_x_bucket,up" {
		t.Fatalf("MetricNames = %v", got)
	}
}

func TestGrafanaProvisioning(t *testing.T) {
	var ds struct {
		APIVersion  int `yaml:"apiVersion"`
		Datasources []struct {
			Name, UID, Type, URL string
		} `yaml:"datasources"`
	}
	strict(t, deployDir(t, "grafana", "provisioning", "datasources", "ars-prometheus.yaml"), &ds, false)
	if ds.APIVersion != 1 || len(ds.Datasources) != 1 || ds.Datasources[0].Type != "prometheus" || ds.Datasources[0].URL == "" {
		t.Fatalf("datasource provisioning: %+v", ds)
	}
	d := LoadDashboard(t)
	var walk func([]Panel)
	walk = func(ps []Panel) {
		for _, p := range ps {
			if p.Type != "row" && (p.Datasource == nil || p.Datasource.UID != ds.Datasources[0].UID) {
				t.Errorf("panel %q does not use the provisioned datasource uid %q", p.Title, ds.Datasources[0].UID)
			}
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	var dp struct {
		APIVersion int `yaml:"apiVersion"`
		Providers  []struct {
			Name, Type string
			Options    struct {
				Path string `yaml:"path"`
			} `yaml:"options"`
		} `yaml:"providers"`
	}
	strict(t, deployDir(t, "grafana", "provisioning", "dashboards", "ars.yaml"), &dp, false)
	if dp.APIVersion != 1 || len(dp.Providers) != 1 || dp.Providers[0].Type != "file" || dp.Providers[0].Options.Path == "" {
		t.Fatalf("dashboard provisioning: %+v", dp)
	}
}

func strict(t *testing.T, path string, v any, known bool) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	dec := yaml.NewDecoder(f)
	dec.KnownFields(known)
	if err := dec.Decode(v); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}

func decodeAll(t *testing.T, path string) []map[string]any {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(b))
	var docs []map[string]any
	for {
		var m map[string]any
		err := dec.Decode(&m)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("%s: document %d: %v", path, len(docs)+1, err)
		}
		if m != nil {
			docs = append(docs, m)
		}
	}
	return docs
}

// get walks a decoded YAML document by keys.
func get(m any, path ...string) any {
	for _, k := range path {
		mm, ok := m.(map[string]any)
		if !ok {
			return nil
		}
		m = mm[k]
	}
	return m
}
