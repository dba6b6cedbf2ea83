// Package e2e holds the end-to-end tests: the real arsd binary against a
// real TCG VM, asserting what an operator would check — the cgroup file
// itself, arsctl's output, the metrics text — and the eBPF run-queue delay
// of real vCPU threads against the kernel's /proc/TID/schedstat.
package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ars-dev/ars/agent/cgroups"
	"github.com/ars-dev/ars/agent/telemetry"
	"github.com/ars-dev/ars/internal/testutil"
	"github.com/ars-dev/ars/internal/vm"
	"github.com/ars-dev/ars/internal/vmtest"
)

// The QMP socket lives in a directory of its own so arsd's discovery sees
// exactly this VM (named "e2e" after the socket).
var (
	qmpDir = mustTempDir()
	guest  = vmtest.NewShared(vm.Config{Name: "e2e", VCPUs: 1, MemMiB: 192,
		QMPSocket: filepath.Join(qmpDir, "e2e.sock")})
)

// defaultPinDir is arsd's default --bpf-pin-dir.
const defaultPinDir = "/sys/fs/bpf/ars"

func mustTempDir() string {
	d, err := os.MkdirTemp("", "ars-e2e-qmp-")
	if err != nil {
		panic(err)
	}
	return d
}

func TestMain(m *testing.M) {
	// arsd pins its eBPF objects under /sys/fs/bpf/ars by default; remove
	// what the tests' agents pinned there (unless it predates the tests).
	_, pinErr := os.Stat(defaultPinDir)
	code := guest.Run(m)
	if os.IsNotExist(pinErr) {
		telemetry.Unpin(defaultPinDir)
	}
	os.RemoveAll(qmpDir)
	os.Exit(code)
}

// vcpuTIDs asks QEMU for its vCPU threads (before arsd holds the monitor).
func vcpuTIDs(t *testing.T, v *vm.VM) []uint32 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	raw, err := v.QMP(ctx, "query-cpus-fast", nil)
	if err != nil {
		t.Fatal(err)
	}
	var cpus []struct {
		ThreadID int `json:"thread-id"`
	}
	if err := json.Unmarshal(raw, &cpus); err != nil {
		t.Fatal(err)
	}
	var tids []uint32
	for _, c := range cpus {
		tids = append(tids, uint32(c.ThreadID))
	}
	if len(tids) == 0 {
		t.Fatal("query-cpus-fast returned no vCPUs")
	}
	return tids
}

func setLoad(t *testing.T, v *vm.VM, cpu int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := v.SetLoad(ctx, vm.Load{CPUPercent: cpu}); err != nil {
		t.Fatal(err)
	}
}

// hog spins a host thread pinned to cpu until stop is set, so a vCPU
// thread pinned there waits in the run queue.
func hog(cpu int, stop *atomic.Bool, done chan<- struct{}) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	defer close(done)
	var set unix.CPUSet
	set.Set(cpu)
	if err := unix.SchedSetaffinity(0, &set); err != nil {
		return
	}
	for !stop.Load() {
	}
}

// TestVCPURunqDelayMatchesSchedstat: the eBPF run-queue delay of the VM's
// vCPU threads agrees with the kernel's own run_delay in
// /proc/TID/schedstat over the same window, within
// telemetry.DefaultCrossCheckTolerance (run delay: 5 % or 2 ms + 10 µs per
// switch-in, whichever is larger). The vCPU is made to wait: the guest
// spins, and the vCPU thread shares CPU 0 with a spinning host thread.
func TestVCPURunqDelayMatchesSchedstat(t *testing.T) {
	testutil.RequireBTF(t)
	v := guest.Get(t)
	tids := vcpuTIDs(t, v)
	r, err := telemetry.LoadRunqlat()
	if err != nil {
		t.Fatalf("%+v", err)
	}
	t.Cleanup(func() { r.Close() })
	for i, tid := range tids {
		if err := r.Track(tid, 0, uint32(i)); err != nil {
			t.Fatal(err)
		}
	}
	// Pin the vCPU threads to CPU 0 beside a host spinner; restore after.
	var cpu0, all unix.CPUSet
	cpu0.Set(0)
	for i := 0; i < runtime.NumCPU(); i++ {
		all.Set(i)
	}
	for _, tid := range tids {
		if err := unix.SchedSetaffinity(int(tid), &cpu0); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.SchedSetaffinity(int(tid), &all) })
	}
	setLoad(t, v, 100)
	t.Cleanup(func() { setLoad(t, v, 0) })
	var stop atomic.Bool
	done := make(chan struct{})
	go hog(0, &stop, done)
	t.Cleanup(func() { stop.Store(true); <-done })

	time.Sleep(500 * time.Millisecond) // every thread switched in since Track
	before, err := r.Sample("/proc", tids)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * time.Second)
	after, err := r.Sample("/proc", tids)
	if err != nil {
		t.Fatal(err)
	}
	agreements, err := telemetry.CrossCheck(before, after, tids, telemetry.DefaultCrossCheckTolerance())
	for _, a := range agreements {
		t.Logf("%v (run delay rel. error %.2f%%)", a, 100*telemetry.RelErr(a.BPF.RunDelayNs, a.Kernel.RunDelayNs))
	}
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range agreements {
		// The check must mean something: the vCPU did wait, a lot.
		if a.Kernel.RunDelayNs < 100*uint64(time.Millisecond) {
			t.Fatalf("tid %d waited only %d ns in 3 s beside a spinner: no contention, nothing checked", a.TID, a.Kernel.RunDelayNs)
		}
	}
}

// freePort returns a loopback TCP port that was free a moment ago.
func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func build(t testing.TB, pkg, out string) string {
	t.Helper()
	bin := filepath.Join(out, filepath.Base(pkg))
	cmd := exec.Command("go", "build", "-o", bin, pkg)
	cmd.Dir = testutil.RepoRoot(t)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, b)
	}
	return bin
}

func readQuota(t testing.TB, dir string) int64 {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "cpu.cfs_quota_us"))
	if err != nil {
		t.Fatal(err)
	}
	q, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return q
}

// waitQuota polls the cgroup file every 10 ms until cond holds or the
// deadline passes.
func waitQuota(t testing.TB, dir string, limit time.Duration, what string, cond func(int64) bool) (int64, time.Duration) {
	t.Helper()
	start := time.Now()
	for {
		q := readQuota(t, dir)
		if cond(q) {
			return q, time.Since(start)
		}
		if time.Since(start) > limit {
			t.Fatalf("%s: quota still %d after %v", what, q, limit)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestArsdFollowsGuestLoad: the real arsd, on a real VM, raises the VM's
// CPU quota within 5 s of the guest's load going up and lowers it after the
// load drops. The test reads the cgroup file itself.
func TestArsdFollowsGuestLoad(t *testing.T) {
	testutil.RequireBTF(t)
	v := guest.Get(t)
	host, err := cgroups.Detect(cgroups.DefaultPaths())
	if err != nil {
		t.Fatal(err)
	}
	if host.VersionOf("cpu") != cgroups.V1 {
		t.Fatalf("this test reads cpu.cfs_quota_us; cpu controller is %v here", host.VersionOf("cpu"))
	}
	cpuDir := v.Cgroup.Dirs["cpu"]
	setLoad(t, v, 0)
	// Leave the shared VM unlimited for whoever runs next.
	t.Cleanup(func() { cgroups.WriteFile(filepath.Join(cpuDir, "cpu.cfs_quota_us"), "-1") })

	work := t.TempDir()
	arsd := build(t, "./cmd/arsd", work)
	arsctl := build(t, "./cmd/arsctl", work)
	metricsAddr := freePort(t)
	ctl := filepath.Join(work, "run", "arsd.sock")
	var logBuf bytes.Buffer
	cmd := exec.Command(arsd, "--qmp-dir", qmpDir, "--control-socket", ctl,
		"--metrics-addr", metricsAddr, "--state-dir", filepath.Join(work, "state"), "--bpf-pin-dir", "off")
	cmd.Stdout, cmd.Stderr = &logBuf, &logBuf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
		if t.Failed() {
			t.Logf("arsd log:\n%s", logBuf.String())
		}
	})

	// Idle: arsd settles the VM at its SLA floor (200 m = 20000 µs / 100 ms).
	q, took := waitQuota(t, cpuDir, 20*time.Second, "idle VM at floor", func(q int64) bool { return q == 20000 })
	t.Logf("idle: quota %d after %v", q, took)
	time.Sleep(2 * time.Second)
	if q := readQuota(t, cpuDir); q != 20000 {
		t.Fatalf("idle VM's quota moved to %d", q)
	}

	setLoad(t, v, 100)
	q, took = waitQuota(t, cpuDir, 5*time.Second, "busy VM raised", func(q int64) bool { return q > 20000 })
	t.Logf("busy: first raise to %d after %v", q, took)
	q, took = waitQuota(t, cpuDir, 20*time.Second, "busy VM near one core", func(q int64) bool { return q >= 90000 })
	t.Logf("busy: quota %d (>= 0.9 core) after %v", q, took)

	// arsctl and the metrics say what the cgroup says.
	out, err := exec.Command(arsctl, "--socket", ctl, "vms").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "e2e") {
		t.Fatalf("arsctl vms: %v\n%s", err, out)
	}
	t.Logf("arsctl vms:\n%s", out)
	resp, err := http.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	want := fmt.Sprintf(`ars_vm_cpu_allocation_cores{vm="e2e"} `)
	if !bytes.Contains(body, []byte(want)) || !bytes.Contains(body, []byte(`ars_vm_runqueue_delay_p99_seconds{vm="e2e"}`)) {
		t.Fatalf("metrics lack the VM's allocation or run-queue delay:\n%s", body)
	}

	setLoad(t, v, 0)
	q, took = waitQuota(t, cpuDir, 60*time.Second, "idle VM lowered", func(q int64) bool { return q <= 30000 })
	t.Logf("idle again: quota %d after %v", q, took)

	// Every change is in the hash-chained audit log, and arsctl verifies it
	// — and names the line after a tampered one.
	logPath := filepath.Join(work, "state", "audit.log")
	out, err = exec.Command(arsctl, "audit", "verify", "--log", logPath).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "intact") {
		t.Fatalf("audit verify on arsd's log: %v\n%s", err, out)
	}
	t.Logf("%s", out)
	cmd.Process.Signal(syscall.SIGTERM) // stop writing before tampering
	<-exited
	exited <- nil
	b, err := os.ReadFile(logPath)
	if err != nil {
		t.Fatal(err)
	}
	tampered := bytes.Replace(b, []byte(`"after":"20000"`), []byte(`"after":"99999"`), 1)
	if bytes.Equal(tampered, b) {
		t.Fatalf("no quota change to the floor in the audit log:\n%s", b)
	}
	os.WriteFile(logPath, tampered, 0o600)
	out, err = exec.Command(arsctl, "audit", "verify", "--log", logPath).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "line") {
		t.Fatalf("audit verify accepted a tampered log: %v\n%s", err, out)
	}
	t.Logf("after tampering: %s", out)
}

// TestVagrantfileValid runs `vagrant validate` (make deps installs vagrant).
func TestVagrantfileValid(t *testing.T) {
	vagrant := testutil.RequireCommand(t, "vagrant")
	cmd := exec.Command(vagrant, "validate")
	cmd.Dir = testutil.RepoRoot(t)
	cmd.Env = append(os.Environ(), "VAGRANT_CHECKPOINT_DISABLE=1")
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "validated successfully") {
		t.Fatalf("vagrant validate: %v\n%s", err, out)
	}
}
