package e2e

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ars-dev/ars/agent/cgroups"
	"github.com/ars-dev/ars/internal/testutil"
)

// TestArsctlTopAndCollectorSplit: the real arsd runs its eBPF telemetry in
// a separate collector process (uid nobody, CAP_BPF and CAP_PERFMON only
// in every thread); `arsctl top --once` shows the VM with its run-queue
// delay, which reached the engine over the collector's ring; a killed
// collector is reported and restarted, and the run-queue delay comes back.
func TestArsctlTopAndCollectorSplit(t *testing.T) {
	testutil.RequireBTF(t)
	v := guest.Get(t)
	cpuDir := v.Cgroup.Dirs["cpu"]
	t.Cleanup(func() { cgroups.WriteFile(filepath.Join(cpuDir, "cpu.cfs_quota_us"), "-1") })
	work := t.TempDir()
	arsd := build(t, "./cmd/arsd", work)
	arsctl := build(t, "./cmd/arsctl", work)
	ctl := filepath.Join(work, "run", "arsd.sock")
	metricsAddr := freePort(t)
	setLoad(t, v, 50)
	t.Cleanup(func() { setLoad(t, v, 0) })
	p := startArsd(t, arsd, "--qmp-dir", qmpDir, "--control-socket", ctl, "--metrics-addr", metricsAddr,
		"--state-dir", filepath.Join(work, "state"))

	// top: the VM's row with a run-queue delay (eBPF through the ring).
	rowRe := regexp.MustCompile(`(?m)^\s*e2e\s.*\d+\.\d+ms\s+\d+\.\d+ms`)
	topOut := func() string {
		out, err := exec.Command(arsctl, "--socket", ctl, "top", "--once").CombinedOutput()
		if err != nil {
			return fmt.Sprintf("arsctl top: %v\n%s", err, out)
		}
		return string(out)
	}
	waitTop := func(what string) string {
		deadline := time.Now().Add(30 * time.Second)
		for {
			out := topOut()
			if rowRe.MatchString(out) {
				return out
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: no e2e row with run-queue delay in arsctl top:\n%s", what, out)
			}
			time.Sleep(500 * time.Millisecond)
		}
	}
	start := time.Now()
	out := waitTop("first frame")
	t.Logf("arsctl top --once after %v:\n%s", time.Since(start).Round(time.Millisecond), out)
	if strings.Contains(out, "\x1b[") {
		t.Error("--once printed terminal control codes")
	}
	if !strings.Contains(out, "[split: collector process]") {
		t.Fatalf("telemetry is not split into a collector process:\n%s", out)
	}
	pid := collectorPID(t, p.cmd.Process.Pid)

	// Every thread of the collector: uid nobody, nothing beyond BPF+PERFMON.
	const allowed = uint64(1)<<39 | uint64(1)<<38 // CAP_BPF, CAP_PERFMON
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, task := range tasks {
		st, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/status", pid, task.Name()))
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range strings.Split(string(st), "\n") {
			f := strings.Fields(l)
			switch {
			case len(f) >= 2 && f[0] == "Uid:" && f[1] != "65534":
				t.Errorf("collector thread %s: %s", task.Name(), l)
			case len(f) == 2 && (f[0] == "CapEff:" || f[0] == "CapPrm:"):
				c, _ := strconv.ParseUint(f[1], 16, 64)
				if c&^allowed != 0 {
					t.Errorf("collector thread %s: %s (more than CAP_BPF|CAP_PERFMON)", task.Name(), l)
				}
			}
		}
	}

	// The collector dies: arsd reports it, restarts it, telemetry resumes.
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	deadline := killed.Add(20 * time.Second)
	for {
		body := topScrape(t, metricsAddr)
		if strings.Contains(body, "ars_collector_restarts_total 1") && strings.Contains(body, "ars_collector_up 1") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("collector not restarted within 20 s:\n%s", grepLines(body, "ars_collector"))
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("collector restarted %v after SIGKILL", time.Since(killed).Round(time.Millisecond))
	if np := collectorPID(t, p.cmd.Process.Pid); np == pid {
		t.Fatalf("collector pid %d still after SIGKILL and restart", pid)
	}
	time.Sleep(3 * time.Second) // a tick or two with the new collector
	out = waitTop("after the collector's restart")
	t.Logf("arsctl top --once after the restart:\n%s", out)

	// The engine dies: its collector does not outlive it.
	pid = collectorPID(t, p.cmd.Process.Pid)
	p.cmd.Process.Kill()
	deadline = time.Now().Add(5 * time.Second)
	for syscall.Kill(pid, 0) == nil {
		if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil && strings.Contains(string(st), ") Z ") {
			break // exited, waiting to be reaped by init
		}
		if time.Now().After(deadline) {
			t.Fatalf("collector pid %d still running 5 s after arsd was killed", pid)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// collectorPID is the one child process of arsd (its collector).
func collectorPID(t *testing.T, arsd int) int {
	t.Helper()
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", arsd))
	if err != nil {
		t.Fatal(err)
	}
	var kids []string
	for _, task := range tasks {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/children", arsd, task.Name()))
		kids = append(kids, strings.Fields(string(b))...)
	}
	if len(kids) != 1 {
		t.Fatalf("arsd has children %v, want its collector only", kids)
	}
	pid, _ := strconv.Atoi(kids[0])
	return pid
}

func topScrape(t *testing.T, addr string) string {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		return ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
