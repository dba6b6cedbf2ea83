package vm_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ars-dev/ars/agent/cgroups"
	"github.com/ars-dev/ars/internal/testutil"
	"github.com/ars-dev/ars/internal/vm"
	"github.com/ars-dev/ars/internal/vmtest"
)

// One guest serves the tests below, in source order: the CPU test needs the
// single vCPU it boots with, so vCPU hotplug comes last.
var shared = vmtest.NewShared(vm.Config{Name: "vmtest", VCPUs: 1, MemMiB: 192, Disk: true, Net: true})

func TestMain(m *testing.M) {
	code := m.Run()
	v := shared.VM()
	var dirs []string
	if v != nil {
		dirs = cgroupDirs(v)
	}
	if err := shared.Close(); err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: close shared guest: %v\n", err)
		code = max(code, 1)
	}
	if v != nil {
		if err := leftovers(v, dirs); err != nil {
			fmt.Fprintf(os.Stderr, "FAIL: shared guest left things behind: %v\n", err)
			code = max(code, 1)
		}
	}
	os.Exit(code)
}

// cgroupDirs lists the VM's cgroup directories (before Close empties the map).
func cgroupDirs(v *vm.VM) []string {
	var dirs []string
	for _, d := range v.Cgroup.Dirs {
		dirs = append(dirs, d)
	}
	return dirs
}

// leftovers reports anything of v that still exists after Close.
func leftovers(v *vm.VM, cgDirs []string) error {
	var errs []error
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", v.PID)); err == nil && strings.Contains(string(b), v.QMPPath) {
		errs = append(errs, fmt.Errorf("QEMU pid %d still running", v.PID))
	}
	if len(cgDirs) == 0 {
		errs = append(errs, errors.New("no cgroup directories recorded"))
	}
	for _, d := range cgDirs {
		if _, err := os.Stat(d); err == nil {
			errs = append(errs, fmt.Errorf("cgroup %s still exists", d))
		}
	}
	if v.NetNS != "" {
		if _, err := os.Stat(filepath.Join("/run/netns", v.NetNS)); err == nil {
			errs = append(errs, fmt.Errorf("netns %s still exists", v.NetNS))
		}
		out, _ := exec.Command("ip", "netns", "list").Output()
		if strings.Contains(string(out), v.NetNS) {
			errs = append(errs, fmt.Errorf("ip netns list still shows %s", v.NetNS))
		}
		if _, err := os.Stat(filepath.Join("/sys/class/net", v.Tap)); err == nil {
			errs = append(errs, fmt.Errorf("tap %s exists in the host netns", v.Tap))
		}
	}
	for _, f := range []string{v.QMPPath, v.CtlPath, v.DiskPath} {
		if _, err := os.Stat(f); f != "" && err == nil {
			errs = append(errs, fmt.Errorf("%s still exists", f))
		}
	}
	return errors.Join(errs...)
}

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func TestGuestReady(t *testing.T) {
	v := shared.Get(t)
	t.Logf("boot time (QEMU start to %s): %s", vm.ReadyLine, v.BootTime().Round(time.Millisecond))
	b, err := os.ReadFile(v.SerialLog)
	if err != nil || !containsLine(strings.ReplaceAll(string(b), "\r", ""), vm.ReadyLine) {
		t.Fatalf("serial log lacks the ready line (%v):\n%s", err, b)
	}
	st, err := v.Status(ctxT(t, 10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if st.Load != (vm.Load{}) || st.CPUs != 1 || st.MemAvailMiB <= 0 || st.MemAvailMiB >= 192 {
		t.Errorf("fresh guest status %+v, want idle with 1 CPU and some of its 192 MiB available", st)
	}

	// QEMU is the pid we hold, and it runs in the VM's cgroup in every
	// controller (it was placed there before exec).
	exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", v.PID))
	if err != nil || !strings.Contains(filepath.Base(exe), "qemu-system") {
		t.Errorf("pid %d is %q (%v), want QEMU", v.PID, exe, err)
	}
	host, err := cgroups.Detect(cgroups.DefaultPaths())
	if err != nil {
		t.Fatal(err)
	}
	m, err := host.MembershipOf(v.PID)
	if err != nil {
		t.Fatal(err)
	}
	for c, rel := range v.Cgroup.Rel {
		if m[c] != rel {
			t.Errorf("QEMU %s cgroup is %q, want %q", c, m[c], rel)
		}
	}
	// Every QEMU thread, vCPUs included, is in the cgroup.
	procs, err := os.ReadFile(filepath.Join(v.Cgroup.Dirs["cpu"], "tasks"))
	if err != nil {
		t.Fatal(err)
	}
	tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", v.PID))
	vcpuThreads := 0
	for _, task := range tasks {
		if !containsLine(string(procs), task.Name()) {
			t.Errorf("QEMU thread %s not in cgroup %s", task.Name(), v.Cgroup.Dirs["cpu"])
		}
		if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/comm", v.PID, task.Name())); string(comm) == "CPU 0/TCG\n" {
			vcpuThreads++
		}
	}
	if vcpuThreads != 1 {
		t.Errorf("found %d threads named \"CPU 0/TCG\", want 1 (debug-threads=on)", vcpuThreads)
	}
}

func containsLine(text, line string) bool {
	for _, l := range strings.Split(text, "\n") {
		if l == line {
			return true
		}
	}
	return false
}

// cgroupCores is the VM cgroup's CPU usage rate over d, in cores, and the
// same from the QEMU threads' own counters (/proc/PID/task/*/schedstat).
func cgroupCores(t *testing.T, v *vm.VM, d time.Duration) (cg, threads float64) {
	t.Helper()
	g, err := v.Cgroup.Group()
	if err != nil {
		t.Fatal(err)
	}
	a, err := cgroups.ReadCPU(g)
	if err != nil {
		t.Fatal(err)
	}
	ta := threadNs(t, v.PID)
	start := time.Now()
	time.Sleep(d)
	b, err := cgroups.ReadCPU(g)
	if err != nil {
		t.Fatal(err)
	}
	tb := threadNs(t, v.PID)
	el := time.Since(start).Seconds()
	return float64(b.UsageNs-a.UsageNs) / 1e9 / el, float64(tb-ta) / 1e9 / el
}

func threadNs(t *testing.T, pid int) uint64 {
	t.Helper()
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		t.Fatal(err)
	}
	var sum uint64
	for _, task := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/schedstat", pid, task.Name()))
		if err != nil {
			continue // thread exited
		}
		f := strings.Fields(string(b))
		if len(f) > 0 {
			n, _ := strconv.ParseUint(f[0], 10, 64)
			sum += n
		}
	}
	return sum
}

func TestCPULoad(t *testing.T) {
	v := shared.Get(t)
	ctx := ctxT(t, 60*time.Second)
	t.Cleanup(func() { v.Command(context.Background(), "cpu 0") })

	if r, err := v.Command(ctx, "cpu 100"); err != nil || r != "ok cpu=100" {
		t.Fatalf("cpu 100: %q, %v", r, err)
	}
	time.Sleep(time.Second)
	// The host is shared with other work; a window in which QEMU could not
	// get a core is retried, a guest that does not load never passes.
	var busy, busyThreads float64
	for i := 0; i < 3; i++ {
		busy, busyThreads = cgroupCores(t, v, 3*time.Second)
		t.Logf("cpu 100: cgroup %.2f cores, QEMU threads %.2f cores", busy, busyThreads)
		if busy > 0.6 {
			break
		}
	}
	if busy <= 0.6 {
		t.Errorf("cpu 100: cgroup usage %.2f cores, want > 0.6", busy)
	}
	if diff := busy - busyThreads; diff > 0.15 || diff < -0.15 {
		t.Errorf("cgroup usage %.2f and QEMU thread time %.2f cores disagree", busy, busyThreads)
	}

	// Duty cycling: half a CPU costs about half a core (plus TCG overhead).
	if r, err := v.Command(ctx, "cpu 50"); err != nil || r != "ok cpu=50" {
		t.Fatalf("cpu 50: %q, %v", r, err)
	}
	time.Sleep(time.Second)
	var half float64
	for i := 0; i < 3; i++ {
		half, _ = cgroupCores(t, v, 3*time.Second)
		t.Logf("cpu 50: cgroup %.2f cores", half)
		if half > 0.3 {
			break
		}
	}
	if half <= 0.3 || half >= 0.8 {
		t.Errorf("cpu 50: cgroup usage %.2f cores, want 0.3-0.8", half)
	}

	if r, err := v.Command(ctx, "cpu 0"); err != nil || r != "ok cpu=0" {
		t.Fatalf("cpu 0: %q, %v", r, err)
	}
	time.Sleep(time.Second)
	idle, idleThreads := cgroupCores(t, v, 3*time.Second)
	t.Logf("cpu 0: cgroup %.2f cores, QEMU threads %.2f cores", idle, idleThreads)
	if idle >= 0.3 {
		t.Errorf("cpu 0: cgroup usage %.2f cores, want < 0.3", idle)
	}
}

func TestMemLoad(t *testing.T) {
	v := shared.Get(t)
	ctx := ctxT(t, 30*time.Second)
	t.Cleanup(func() { v.Command(context.Background(), "mem 0") })
	usage := func() uint64 {
		b, err := os.ReadFile(filepath.Join(v.Cgroup.Dirs["memory"], "memory.usage_in_bytes"))
		if err != nil {
			t.Fatal(err)
		}
		n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	before := usage()
	if r, err := v.Command(ctx, "mem 96"); err != nil || r != "ok mem=96" {
		t.Fatalf("mem 96: %q, %v", r, err)
	}
	after := usage()
	grew := float64(after-before) / (1 << 20)
	t.Logf("mem 96: QEMU cgroup memory %d -> %d MiB (+%.0f)", before>>20, after>>20, grew)
	// Guest pages never touched before cost the host nothing until now.
	// About 25 MiB of a fresh guest's free pages were touched during boot
	// (kernel decompression, initramfs), so expect well over half.
	if grew < 48 {
		t.Errorf("mem 96 grew the QEMU cgroup by %.0f MiB, want >= 48", grew)
	}
	r, err := v.Command(ctx, "mem 4096")
	var ce *vm.CommandError
	if !errors.As(err, &ce) || !strings.HasPrefix(r, "err mem:") {
		t.Errorf("mem 4096 in a 192 MiB guest: %q, %v; want err", r, err)
	}
	if st, err := v.Status(ctx); err != nil || st.MemMiB != 96 {
		t.Errorf("after refused mem 4096: %+v, %v; want mem=96 kept", st, err)
	}
}

func TestDiskIO(t *testing.T) {
	v := shared.Get(t)
	ctx := ctxT(t, 30*time.Second)
	t.Cleanup(func() { v.Command(context.Background(), "io 0") })
	written := func() uint64 {
		raw, err := v.QMP(ctx, "query-blockstats", nil)
		if err != nil {
			t.Fatal(err)
		}
		var stats []struct {
			Device string `json:"device"`
			Stats  struct {
				WrBytes uint64 `json:"wr_bytes"`
			} `json:"stats"`
		}
		if err := json.Unmarshal(raw, &stats); err != nil {
			t.Fatal(err)
		}
		for _, s := range stats {
			if s.Device == "disk0" {
				return s.Stats.WrBytes
			}
		}
		t.Fatalf("no disk0 in query-blockstats: %s", raw)
		return 0
	}
	if r, err := v.Command(ctx, "io 512"); err != nil || r != "ok io=512" {
		t.Fatalf("io 512: %q, %v", r, err)
	}
	time.Sleep(time.Second)
	a, start := written(), time.Now()
	time.Sleep(3 * time.Second)
	b := written()
	rate := float64(b-a) / 1024 / time.Since(start).Seconds()
	t.Logf("io 512: QEMU wrote %.0f KiB/s to the image (cache=%s)", rate, v.DiskCache)
	if rate < 256 || rate > 768 {
		t.Errorf("io 512: %.0f KiB/s written, want 512 ±50%%", rate)
	}
	if _, err := v.Command(ctx, "io 0"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond)
	a = written()
	time.Sleep(2 * time.Second)
	if b := written(); b-a > 64<<10 {
		t.Errorf("io 0: still %d bytes written in 2 s", b-a)
	}
}

func TestNetLoad(t *testing.T) {
	v := shared.Get(t)
	ctx := ctxT(t, 30*time.Second)
	t.Cleanup(func() { v.Command(context.Background(), "net 0") })

	// The tap lives in the VM's netns, not in ours.
	out, err := exec.Command("ip", "-n", v.NetNS, "-o", "link", "show", "dev", v.Tap).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "UP") {
		t.Fatalf("tap %s in netns %s: %v: %s", v.Tap, v.NetNS, err, out)
	}
	if _, err := os.Stat(filepath.Join("/sys/class/net", v.Tap)); err == nil {
		t.Errorf("tap %s visible in the host netns", v.Tap)
	}

	if r, err := v.Command(ctx, "net 500"); err != nil || r != "ok net=500" {
		t.Fatalf("net 500: %q, %v", r, err)
	}
	time.Sleep(time.Second)
	a, err := v.TapStats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	time.Sleep(3 * time.Second)
	b, err := v.TapStats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	kbps := float64(b.RxBytes-a.RxBytes) * 8 / 1000 / time.Since(start).Seconds()
	t.Logf("net 500: tap rx %.0f kbit/s (%d frames)", kbps, b.RxPackets-a.RxPackets)
	// 500 kbit/s of UDP payload is ~521 kbit/s of Ethernet frames.
	if kbps < 250 || kbps > 800 {
		t.Errorf("net 500: tap received %.0f kbit/s, want ~520", kbps)
	}
	if _, err := v.Command(ctx, "net 0"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond)
	a, _ = v.TapStats(ctx)
	time.Sleep(2 * time.Second)
	b, _ = v.TapStats(ctx)
	if d := b.RxBytes - a.RxBytes; d > 8<<10 {
		t.Errorf("net 0: tap still received %d bytes in 2 s", d)
	}
}

func TestProtocol(t *testing.T) {
	v := shared.Get(t)
	ctx := ctxT(t, 30*time.Second)
	r, err := v.Command(ctx, "bogus 1")
	var ce *vm.CommandError
	if !errors.As(err, &ce) || !strings.HasPrefix(r, "err unknown command") {
		t.Errorf("bogus: %q, %v", r, err)
	}
	if _, err := v.Command(ctx, "cpu 1\nmem 2"); err == nil {
		t.Error("multi-line command accepted")
	}
	// Concurrent callers each get their own answer.
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			want := fmt.Sprintf("ok cpu=%d", i)
			if r, err := v.Command(ctx, fmt.Sprintf("cpu %d", i)); err != nil || r != want {
				t.Errorf("cpu %d: %q, %v", i, r, err)
			}
		}(i)
	}
	wg.Wait()
	// A schedule runs in order and holds its last step.
	if r, err := v.Command(ctx, "schedule 1s:cpu=10,mem=4 1s:cpu=20"); err != nil || !strings.HasPrefix(r, "ok schedule steps=2") {
		t.Fatalf("schedule: %q, %v", r, err)
	}
	if st, _ := v.Status(ctx); st.CPUPercent != 10 || st.MemMiB != 4 {
		t.Errorf("first step not in force: %+v", st)
	}
	time.Sleep(2500 * time.Millisecond)
	if st, _ := v.Status(ctx); st.CPUPercent != 20 || st.MemMiB != 4 {
		t.Errorf("last step not held: %+v", st)
	}
	if err := v.SetLoad(ctx, vm.Load{}); err != nil {
		t.Fatal(err)
	}
	if st, err := v.Status(ctx); err != nil || st.Load != (vm.Load{}) {
		t.Errorf("after SetLoad(zero): %+v, %v", st, err)
	}
	// A command abandoned by its caller does not confuse the next one.
	short, cancel := context.WithTimeout(ctx, time.Microsecond)
	defer cancel()
	v.Command(short, "status")
	if st, err := v.Status(ctx); err != nil || st.CPUs < 1 {
		t.Errorf("status after an abandoned command: %+v, %v", st, err)
	}
}

// TestHotplugCPU runs last on the shared guest: it leaves it with 2 vCPUs.
func TestHotplugCPU(t *testing.T) {
	v := shared.Get(t)
	ctx := ctxT(t, 60*time.Second)
	raw, err := v.QMP(ctx, "query-hotpluggable-cpus", nil)
	if err != nil {
		t.Fatal(err)
	}
	var slots []struct {
		Type    string         `json:"type"`
		Props   map[string]int `json:"props"`
		QOMPath string         `json:"qom-path"`
	}
	if err := json.Unmarshal(raw, &slots); err != nil {
		t.Fatal(err)
	}
	var free map[string]int
	var driver string
	for _, s := range slots {
		if s.QOMPath == "" && s.Props["core-id"] == 1 {
			free, driver = s.Props, s.Type
		}
	}
	if free == nil {
		t.Fatalf("no free slot for core 1 in %s", raw)
	}
	args := map[string]any{"driver": driver, "id": "cpu1"}
	for k, n := range free {
		args[k] = n
	}
	if _, err := v.QMP(ctx, "device_add", args); err != nil {
		t.Fatal(err)
	}
	var st vm.Status
	for st.CPUs != 2 && ctx.Err() == nil {
		time.Sleep(500 * time.Millisecond)
		st, err = v.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
	}
	if st.CPUs != 2 {
		t.Fatalf("guest reports %d CPUs after hotplug, want 2", st.CPUs)
	}
	raw, err = v.QMP(ctx, "query-cpus-fast", nil)
	if err != nil {
		t.Fatal(err)
	}
	var cpus []struct {
		ThreadID int `json:"thread-id"`
	}
	if err := json.Unmarshal(raw, &cpus); err != nil {
		t.Fatal(err)
	}
	if len(cpus) != 2 {
		t.Fatalf("query-cpus-fast lists %d vCPUs, want 2", len(cpus))
	}
	tasks, err := os.ReadFile(filepath.Join(v.Cgroup.Dirs["cpu"], "tasks"))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range cpus {
		if !containsLine(string(tasks), strconv.Itoa(c.ThreadID)) {
			t.Errorf("vCPU thread %d not in the VM cgroup", c.ThreadID)
		}
	}
}

// TestCloseRemovesEverything needs no booted guest: QEMU, cgroup, netns,
// tap and sockets exist from Start on.
func TestCloseRemovesEverything(t *testing.T) {
	testutil.RequirePrivileged(t)
	gd := vmtest.GuestDir(t)
	ctx := ctxT(t, 30*time.Second)
	v, err := vm.Start(ctx, nil, vm.Config{Name: "close", Dir: t.TempDir(), Net: true, Disk: true,
		Kernel: filepath.Join(gd, "vmlinuz"), Initrd: filepath.Join(gd, "initramfs.gz")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close() })
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", v.PID)); err != nil {
		t.Fatalf("QEMU pid %d: %v", v.PID, err)
	}
	for _, d := range v.Cgroup.Dirs {
		if _, err := os.Stat(d); err != nil {
			t.Fatalf("cgroup: %v", err)
		}
	}
	if out, err := exec.Command("ip", "-n", v.NetNS, "link", "show", "dev", v.Tap).CombinedOutput(); err != nil {
		t.Fatalf("tap: %v: %s", err, out)
	}
	dirs := cgroupDirs(v)
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	if err := leftovers(v, dirs); err != nil {
		t.Error(err)
	}
	if err := v.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	select {
	case <-v.Exited():
	default:
		t.Error("Exited not closed after Close")
	}
}

// TestStartFailureCleansUp makes QEMU fail (an unknown option) after the
// cgroup, disk and netns exist, and checks that none of them outlives Start.
func TestStartFailureCleansUp(t *testing.T) {
	testutil.RequirePrivileged(t)
	testutil.RequireCommand(t, "qemu-system-x86_64")
	gd := vmtest.GuestDir(t)
	dir := t.TempDir()
	host, err := cgroups.Detect(cgroups.DefaultPaths())
	if err != nil {
		t.Fatal(err)
	}
	self, err := host.MembershipOf(0)
	if err != nil {
		t.Fatal(err)
	}
	ctx := ctxT(t, 30*time.Second)
	v, err := vm.Start(ctx, host, vm.Config{Name: "broken", Dir: dir, Net: true, Disk: true,
		Kernel: filepath.Join(gd, "vmlinuz"), Initrd: filepath.Join(gd, "initramfs.gz"),
		ExtraArgs: []string{"-no-such-option"}})
	if err == nil {
		v.Close()
		t.Fatal("Start with a bad QEMU option succeeded")
	}
	if !strings.Contains(err.Error(), "no-such-option") {
		t.Errorf("error does not quote QEMU's complaint: %v", err)
	}
	t.Logf("Start failed as expected: %v", err)
	cpuDir := filepath.Join(host.V1["cpu"], self["cpu"])
	if host.VersionOf("cpu") != cgroups.V1 {
		cpuDir = filepath.Join(host.Unified, self[""])
	}
	matches, _ := filepath.Glob(filepath.Join(cpuDir, "ars-broken-*"))
	if len(matches) > 0 {
		t.Errorf("cgroups left behind: %v", matches)
	}
	out, _ := exec.Command("ip", "netns", "list").Output()
	if strings.Contains(string(out), "ars-broken-") {
		t.Errorf("netns left behind: %s", out)
	}
	for _, f := range []string{"qmp.sock", "ctl.sock", "disk.raw"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err == nil {
			t.Errorf("%s left behind", f)
		}
	}
}
