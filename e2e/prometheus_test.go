package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ars-dev/ars/agent/cgroups"
	"github.com/ars-dev/ars/internal/testutil"
)

// promResp is the envelope of Prometheus's HTTP API.
type promResp struct {
	Status    string          `json:"status"`
	Error     string          `json:"error"`
	ErrorType string          `json:"errorType"`
	Data      json.RawMessage `json:"data"`
}

func promGet(t *testing.T, base, path string, q url.Values) (promResp, error) {
	t.Helper()
	resp, err := http.Get(base + path + "?" + q.Encode())
	if err != nil {
		return promResp{}, err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var r promResp
	if err := json.Unmarshal(b, &r); err != nil {
		return r, fmt.Errorf("%s: %v: %s", path, err, b)
	}
	if r.Status != "success" {
		return r, fmt.Errorf("%s %v: %s: %s", path, q, r.ErrorType, r.Error)
	}
	return r, nil
}

// promQuery runs an instant query and returns the number of series.
func promQuery(t *testing.T, base, expr string) (int, error) {
	r, err := promGet(t, base, "/api/v1/query", url.Values{"query": {expr}})
	if err != nil {
		return 0, err
	}
	var d struct {
		ResultType string            `json:"resultType"`
		Result     []json.RawMessage `json:"result"`
	}
	if err := json.Unmarshal(r.Data, &d); err != nil {
		return 0, err
	}
	if d.ResultType == "scalar" {
		return 1, nil
	}
	return len(d.Result), nil
}

// dashboardExprs returns every PromQL expression of the Grafana dashboard
// (panel targets, nested rows, and the variables' label_values selectors).
func dashboardExprs(t *testing.T) map[string]string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(testutil.RepoRoot(t), "deploy", "grafana", "ars-dashboard.json"))
	if err != nil {
		t.Fatal(err)
	}
	type panel struct {
		Title   string `json:"title"`
		Targets []struct {
			Expr  string `json:"expr"`
			RefID string `json:"refId"`
		} `json:"targets"`
		Panels []json.RawMessage `json:"panels"`
	}
	var d struct {
		Panels     []json.RawMessage `json:"panels"`
		Templating struct {
			List []struct {
				Name  string `json:"name"`
				Query struct {
					Query string `json:"query"`
				} `json:"query"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	var walk func([]json.RawMessage)
	walk = func(ps []json.RawMessage) {
		for _, raw := range ps {
			var p panel
			if err := json.Unmarshal(raw, &p); err != nil {
				t.Fatal(err)
			}
			for _, tg := range p.Targets {
				out[p.Title+"/"+tg.RefID] = tg.Expr
			}
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	for _, v := range d.Templating.List {
		q := strings.TrimSuffix(strings.TrimPrefix(v.Query.Query, "label_values("), ")")
		q, _, _ = strings.Cut(q, ", ")
		out["variable "+v.Name] = q
	}
	return out
}

// grafanaVars stands in for Grafana's template variables.
var grafanaVars = strings.NewReplacer(`$__rate_interval`, `5s`, `$instance`, `.*`, `$vm`, `e2e`)

// TestPrometheusScrapesArsd: a real Prometheus (Debian's package, on
// loopback, temp data dir) scrapes a real arsd managing the shared TCG VM
// and evaluates deploy/prometheus/ars-alerts.yml. Every dashboard query
// and every alert expression must be accepted by Prometheus's API; the
// core panels must return data; every rule must evaluate healthy.
func TestPrometheusScrapesArsd(t *testing.T) {
	testutil.RequireBTF(t)
	promBin := testutil.RequireCommand(t, "prometheus")
	v := guest.Get(t)
	setLoad(t, v, 50) // some demand, so usage and run-queue delay are non-trivial
	t.Cleanup(func() { setLoad(t, v, 0) })
	host, err := cgroups.Detect(cgroups.DefaultPaths())
	if err != nil {
		t.Fatal(err)
	}
	// Leave the shared VM unlimited for whoever runs next.
	t.Cleanup(func() {
		if host.VersionOf("cpu") == cgroups.V1 {
			cgroups.WriteFile(filepath.Join(v.Cgroup.Dirs["cpu"], "cpu.cfs_quota_us"), "-1")
		} else {
			cgroups.WriteFile(filepath.Join(v.Cgroup.Dirs["cpu"], "cpu.max"), "max")
		}
	})

	work := t.TempDir()
	arsd := build(t, "./cmd/arsd", work)
	metricsAddr := freePort(t)
	startArsd(t, arsd, "--qmp-dir", qmpDir, "--control-socket", filepath.Join(work, "run", "arsd.sock"),
		"--metrics-addr", metricsAddr, "--state-dir", filepath.Join(work, "state"))

	rules := filepath.Join(testutil.RepoRoot(t), "deploy", "prometheus", "ars-alerts.yml")
	cfg := filepath.Join(work, "prometheus.yml")
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf(`global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files: [%q]
scrape_configs:
  - job_name: arsd
    static_configs:
      - targets: [%q]
`, rules, metricsAddr)), 0o644); err != nil {
		t.Fatal(err)
	}
	promAddr := freePort(t)
	var promLog bytes.Buffer
	prom := exec.Command(promBin, "--config.file="+cfg, "--storage.tsdb.path="+filepath.Join(work, "prom-data"),
		"--web.listen-address="+promAddr, "--log.level=warn")
	prom.Stdout, prom.Stderr = &promLog, &promLog
	if err := prom.Start(); err != nil {
		t.Fatal(err)
	}
	promExited := make(chan struct{})
	go func() { prom.Wait(); close(promExited) }()
	t.Cleanup(func() {
		prom.Process.Signal(syscall.SIGTERM)
		select {
		case <-promExited:
		case <-time.After(10 * time.Second):
			prom.Process.Kill()
			<-promExited
		}
		if t.Failed() {
			t.Logf("prometheus log:\n%s", promLog.String())
		}
	})
	base := "http://" + promAddr

	// A scrape has landed once the VM's series are there.
	deadline := time.Now().Add(30 * time.Second)
	for {
		n1, err1 := promQuery(t, base, `ars_build_info{job="arsd"}`)
		n2, err2 := promQuery(t, base, `ars_vm_cpu_usage_cores{job="arsd", vm="e2e"}`)
		if err1 == nil && err2 == nil && n1 == 1 && n2 == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no ars_build_info / ars_vm_cpu_usage_cores{vm=\"e2e\"} in Prometheus after 30 s: %v %v (%d, %d series)", err1, err2, n1, n2)
		}
		select {
		case <-promExited:
			t.Fatalf("prometheus exited:\n%s", promLog.String())
		case <-time.After(500 * time.Millisecond):
		}
	}
	// Enough samples (1 s scrapes) for 5 s rate windows.
	time.Sleep(7 * time.Second)

	// Every dashboard query parses; the core ones return data. Others
	// (block I/O, network, page faults, eBPF run time) depend on what the
	// guest does and on kernel BPF stats, so they are reported, not required.
	mustHaveData := regexp.MustCompile(`ars_vm_cpu_(usage|demand|forecast|allocation|floor|ceiling|required)_cores|ars_host_allocatable|ars_vm_borrowed|ars_build_info|ars_ticks_total|ars_bpf_probe_up|ars_vcpu_runqueue_delay_seconds_bucket|ars_vms\b|ars_drm_generation|process_resident_memory_bytes|up\{`)
	var empty []string
	for where, raw := range dashboardExprs(t) {
		expr := grafanaVars.Replace(raw)
		n, err := promQuery(t, base, expr)
		if err != nil {
			t.Errorf("dashboard %s: %v", where, err)
			continue
		}
		if n == 0 {
			empty = append(empty, where)
			if mustHaveData.MatchString(raw) && !strings.Contains(raw, "> 0") && !strings.Contains(raw, "/ rate(") {
				t.Errorf("dashboard %s: no data for %s", where, expr)
			}
		}
	}
	t.Logf("dashboard queries without data here: %q", empty)

	// Every alert expression parses; every rule is loaded and healthy.
	r, err := promGet(t, base, "/api/v1/rules", nil)
	if err != nil {
		t.Fatal(err)
	}
	var rd struct {
		Groups []struct {
			Name  string `json:"name"`
			Rules []struct {
				Name           string    `json:"name"`
				Query          string    `json:"query"`
				Health         string    `json:"health"`
				LastError      string    `json:"lastError"`
				LastEvaluation time.Time `json:"lastEvaluation"`
				State          string    `json:"state"`
			} `json:"rules"`
		} `json:"groups"`
	}
	if err := json.Unmarshal(r.Data, &rd); err != nil {
		t.Fatal(err)
	}
	nrules := 0
	for _, g := range rd.Groups {
		for _, rule := range g.Rules {
			nrules++
			if rule.Health != "ok" || rule.LastEvaluation.IsZero() {
				t.Errorf("rule %s: health %q, last evaluation %v, error %q", rule.Name, rule.Health, rule.LastEvaluation, rule.LastError)
			}
			n, err := promQuery(t, base, rule.Query)
			if err != nil {
				t.Errorf("alert %s: %v", rule.Name, err)
			}
			t.Logf("alert %s: %s (%d series now)", rule.Name, rule.State, n)
		}
	}
	if nrules < 5 {
		t.Fatalf("Prometheus loaded %d rules from %s", nrules, rules)
	}

	// The metric names the dashboard uses that this arsd exposes right now.
	resp, err := http.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, m := range []string{"ars_build_info", "ars_vm_cpu_violation_ratio", "ars_vm_cpu_throttled_periods",
		"ars_bpf_probe_up", "ars_vcpu_runqueue_delay_seconds_bucket", "ars_bpf_program_run_seconds_total"} {
		if !regexp.MustCompile(`(?m)^` + m + `[{ ]`).Match(body) {
			t.Errorf("arsd /metrics has no %s", m)
		}
	}
}
