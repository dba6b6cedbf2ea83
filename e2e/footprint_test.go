package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ars-dev/ars/agent/cgroups"
	"github.com/ars-dev/ars/agent/qmp"
	"github.com/ars-dev/ars/agent/qmp/qmptest"
	"github.com/ars-dev/ars/internal/testutil"
)

// procCPU returns utime+stime of pid in seconds and its VmRSS in bytes.
func procCPU(pid int) (cpuSec float64, rss uint64, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0, err
	}
	// Fields after the parenthesised comm; utime and stime are 14 and 15.
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+2:]))
	ut, _ := strconv.ParseUint(f[11], 10, 64)
	st, _ := strconv.ParseUint(f[12], 10, 64)
	s, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0, err
	}
	for _, line := range strings.Split(string(s), "\n") {
		if strings.HasPrefix(line, "VmRSS:") {
			kb, _ := strconv.ParseUint(strings.Fields(line)[1], 10, 64)
			rss = kb * 1024
		}
	}
	return float64(ut+st) / 100, rss, nil // USER_HZ is 100 on Linux
}

// treeCPU is procCPU summed over pid and its children (arsd's engine and
// its telemetry collector process).
func treeCPU(pid int) (cpuSec float64, rss uint64, err error) {
	cpuSec, rss, err = procCPU(pid)
	if err != nil {
		return 0, 0, err
	}
	tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	for _, task := range tasks {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/children", pid, task.Name()))
		for _, c := range strings.Fields(string(b)) {
			cp, _ := strconv.Atoi(c)
			if c2, r2, err := procCPU(cp); err == nil {
				cpuSec, rss = cpuSec+c2, rss+r2
			}
		}
	}
	return cpuSec, rss, nil
}

// BenchmarkAgentFootprint10VMs measures what arsd itself costs with ten
// VMs under management at the default 1 s tick: ten QEMUs (no guest
// kernel; firmware runs and idles, each in a cgroup of its own under
// ours), their vCPU threads tracked by eBPF, quotas written. It reports
// arsd's CPU (engine and collector processes together) as % of one core
// over a 30 s window and their peak RSS (summed).
//
//	sudo go test -run '^$' -bench AgentFootprint -benchtime 1x ./e2e/
func BenchmarkAgentFootprint10VMs(b *testing.B) {
	testutil.RequireBTF(b)
	host, err := cgroups.Detect(cgroups.DefaultPaths())
	if err != nil {
		b.Fatal(err)
	}
	work := b.TempDir()
	qdir := filepath.Join(work, "qmp")
	os.Mkdir(qdir, 0o700)
	for i := 0; i < 10; i++ {
		sock := filepath.Join(qdir, fmt.Sprintf("vm%02d.sock", i))
		q := qmptest.StartQEMU(b, sock, "1,maxcpus=2")
		cg, err := host.CreateUnderSelf(fmt.Sprintf("ars-footprint-%d-%d", os.Getpid(), i), "cpu", "cpuacct")
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { q.Kill(); cg.Remove() })
		if err := cg.AddPID(q.PID); err != nil {
			b.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		m, err := qmp.Dial(ctx, sock, qmp.Options{})
		if err == nil {
			err = m.Execute(ctx, "cont", nil, nil) // leave -S: let the vCPU run
			m.Close()
		}
		cancel()
		if err != nil {
			b.Fatal(err)
		}
	}
	arsd := build(b, "./cmd/arsd", work)
	var logBuf bytes.Buffer
	cmd := exec.Command(arsd, "--qmp-dir", qdir, "--control-socket", filepath.Join(work, "arsd.sock"),
		"--metrics-addr", "off", "--state-dir", filepath.Join(work, "state"), "--bpf-pin-dir", "off")
	cmd.Stdout, cmd.Stderr = &logBuf, &logBuf
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cmd.Process.Signal(syscall.SIGTERM); cmd.Wait() })
	time.Sleep(5 * time.Second) // discovery, first allocations
	if n := strings.Count(logBuf.String(), "vm discovered"); n != 10 {
		b.Fatalf("arsd discovered %d VMs, want 10; log:\n%s", n, logBuf.String())
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		e0, _, _ := procCPU(cmd.Process.Pid)
		c0, _, err := treeCPU(cmd.Process.Pid)
		if err != nil {
			b.Fatal(err)
		}
		const window = 30 * time.Second
		var peak uint64
		for t0 := time.Now(); time.Since(t0) < window; time.Sleep(time.Second) {
			_, rss, err := treeCPU(cmd.Process.Pid)
			if err != nil {
				b.Fatal(err)
			}
			peak = max(peak, rss)
		}
		c1, _, _ := treeCPU(cmd.Process.Pid)
		e1, _, _ := procCPU(cmd.Process.Pid)
		pct := 100 * (c1 - c0) / window.Seconds()
		b.Logf("of which the engine process: %.2f%% of one core", 100*(e1-e0)/window.Seconds())
		b.ReportMetric(pct, "cpu-%-of-core")
		b.ReportMetric(float64(peak)/(1<<20), "peak-rss-MiB")
		b.Logf("arsd with 10 VMs: %.2f%% of one core, peak RSS %.1f MiB", pct, float64(peak)/(1<<20))
	}
}
