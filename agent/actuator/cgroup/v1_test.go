package cgroup

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ars-dev/ars/agent/cgroups"
	"github.com/ars-dev/ars/internal/testutil"
)

const helperEnv = "ARS_CGROUP_TEST_HELPER"

// TestMain doubles as a memory-touching helper when re-executed with
// ARS_CGROUP_TEST_HELPER=mem:<MiB>: it waits for a line on stdin (so the
// parent can move it into a cgroup first; v1 does not move existing charges),
// touches <MiB> MiB, prints "ready" and blocks until stdin closes.
func TestMain(m *testing.M) {
	if h := os.Getenv(helperEnv); h != "" {
		mib, _ := strconv.Atoi(strings.TrimPrefix(h, "mem:"))
		in := bufio.NewReader(os.Stdin)
		_, _ = in.ReadString('\n')
		buf := make([]byte, mib<<20)
		for i := 0; i < len(buf); i += 4096 {
			buf[i] = 1
		}
		fmt.Println("ready")
		_, _ = io.Copy(io.Discard, in)
		buf[0]++
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// v1Setup makes a test cgroup under our own cgroup in each controller.
func v1Setup(t testing.TB, controllers ...string) (*cgroups.Host, *cgroups.Owned, Target) {
	t.Helper()
	testutil.RequirePrivileged(t)
	h, err := cgroups.Detect(cgroups.DefaultPaths())
	if err != nil {
		testutil.SkipOrFail(t, err.Error())
	}
	for _, c := range controllers {
		if h.VersionOf(c) != cgroups.V1 {
			testutil.SkipOrFail(t, "controller "+c+" is not v1 on this host")
		}
	}
	name := fmt.Sprintf("ars-cgtest-%d-%s", os.Getpid(), strings.NewReplacer("/", "-").Replace(t.Name()))
	o, err := h.CreateUnderSelf(name, controllers...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := o.Remove(); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	return h, o, TargetFor(h, name, o.Rel)
}

// start runs a command and kills it (by PID) in cleanup.
func start(t testing.TB, cmd *exec.Cmd) *exec.Cmd {
	t.Helper()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = syscall.Kill(cmd.Process.Pid, syscall.SIGKILL)
		_ = cmd.Wait()
	})
	return cmd
}

func fileIs(t *testing.T, path, want string) {
	t.Helper()
	if got := read(t, path); got != want {
		t.Fatalf("%s = %q, want %q", path, got, want)
	}
}

func TestV1CPU(t *testing.T) {
	_, o, tg := v1Setup(t, "cpu", "cpuacct")
	ctx := context.Background()
	busy := start(t, exec.Command("sh", "-c", "while :; do :; done"))
	if err := o.AddPID(busy.Process.Pid); err != nil {
		t.Fatal(err)
	}
	w := New(Paths{Sys: "/sys"})
	if err := w.SetCPU(ctx, tg, 10000, 50000); err != nil {
		t.Fatal(err)
	}
	fileIs(t, filepath.Join(tg.CPU.Path, "cpu.cfs_quota_us"), "10000")
	fileIs(t, filepath.Join(tg.CPU.Path, "cpu.cfs_period_us"), "50000")
	g, err := o.Group()
	if err != nil {
		t.Fatal(err)
	}
	before, err := cgroups.ReadCPU(g)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(600 * time.Millisecond)
	after, err := cgroups.ReadCPU(g)
	if err != nil {
		t.Fatal(err)
	}
	used := float64(after.UsageNs-before.UsageNs) / 0.6e9
	t.Logf("20%% quota: nr_throttled %d→%d, CPU use %.2f", before.Throttled, after.Throttled, used)
	if after.Throttled-before.Throttled < 5 || used > 0.3 {
		t.Fatalf("quota not enforced: throttled +%d, use %.2f CPUs", after.Throttled-before.Throttled, used)
	}
	if err := w.SetCPUWeight(ctx, tg, 200); err != nil {
		t.Fatal(err)
	}
	fileIs(t, filepath.Join(tg.CPU.Path, "cpu.shares"), "2048")
	for _, bad := range [][2]int64{{500, 100000}, {50000, 500}, {50000, 2_000_000}} {
		if err := w.SetCPU(ctx, tg, bad[0], uint64(bad[1])); !errors.Is(err, ErrInvalid) {
			t.Errorf("SetCPU(%v) = %v", bad, err)
		}
	}
	if err := w.SetCPUWeight(ctx, tg, 0); !errors.Is(err, ErrInvalid) {
		t.Error(err)
	}
	fileIs(t, filepath.Join(tg.CPU.Path, "cpu.cfs_quota_us"), "10000")
	fileIs(t, filepath.Join(tg.CPU.Path, "cpu.shares"), "2048")
	s, err := w.Read(ctx, tg)
	if err != nil || s.QuotaUs != 10000 || s.PeriodUs != 50000 || s.Shares != 2048 || s.Weight != 200 {
		t.Fatalf("Read %+v %v", s, err)
	}
	if err := w.SetCPU(ctx, tg, -1, 100000); err != nil {
		t.Fatal(err)
	}
	fileIs(t, filepath.Join(tg.CPU.Path, "cpu.cfs_quota_us"), "-1")
}

// TestV1CPUOrder shows the kernel rejecting the naive order under a limited
// parent and SetCPU choosing the order it accepts.
func TestV1CPUOrder(t *testing.T) {
	h, _, parent := v1Setup(t, "cpu")
	ctx := context.Background()
	w := New(Paths{Sys: "/sys"})
	if err := w.SetCPU(ctx, parent, 50000, 100000); err != nil { // parent: 0.5 CPU
		t.Fatal(err)
	}
	childDir := filepath.Join(parent.CPU.Path, "child")
	if err := os.Mkdir(childDir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.Remove(childDir) })
	child := Target{Name: "child", CPU: Dir{Path: childDir, Mount: h.V1["cpu"], Version: cgroups.V1}}
	if err := w.SetCPU(ctx, child, 50000, 100000); err != nil {
		t.Fatal(err)
	}
	quota, period := filepath.Join(childDir, "cpu.cfs_quota_us"), filepath.Join(childDir, "cpu.cfs_period_us")
	// Naive lowering: period first makes 50000/20000 = 2.5 CPUs > parent's 0.5.
	if err := cgroups.WriteFile(period, "20000"); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("kernel accepted period first (err %v); the ordering premise does not hold here", err)
	}
	var order []string
	w.Trace = func(file, v string) { order = append(order, filepath.Base(file)+"="+v) }
	if err := w.SetCPU(ctx, child, 10000, 20000); err != nil {
		t.Fatal(err)
	}
	fileIs(t, quota, "10000")
	fileIs(t, period, "20000")
	t.Logf("lowering order: %v", order)
	// Naive raising: quota first makes 50000/20000 again.
	if err := cgroups.WriteFile(quota, "50000"); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("kernel accepted quota first (err %v)", err)
	}
	order = nil
	if err := w.SetCPU(ctx, child, 50000, 100000); err != nil {
		t.Fatal(err)
	}
	fileIs(t, quota, "50000")
	fileIs(t, period, "100000")
	t.Logf("raising order: %v", order)
	// Exceeding the parent is the kernel's call and is reported.
	if err := w.SetCPU(ctx, child, 80000, 100000); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("child above parent: %v", err)
	}
}

func TestV1Cpuset(t *testing.T) {
	_, o, tg := v1Setup(t, "cpuset")
	ctx := context.Background()
	w := New(Paths{Sys: "/sys"})
	parentCpus := read(t, filepath.Join(filepath.Dir(tg.Cpuset.Path), "cpuset.effective_cpus"))
	pc, _ := ParseList(parentCpus)
	if len(pc) < 2 {
		testutil.SkipOrFail(t, "needs 2 CPUs, parent has "+parentCpus)
	}
	first := FormatList(map[int]bool{minKey(pc): true})
	if err := w.SetCpuset(ctx, tg, first, read(t, filepath.Join(filepath.Dir(tg.Cpuset.Path), "cpuset.effective_mems"))); err != nil {
		t.Fatal(err)
	}
	fileIs(t, filepath.Join(tg.Cpuset.Path, "cpuset.cpus"), first)
	busy := start(t, exec.Command("sh", "-c", "while :; do :; done"))
	if err := o.AddPID(busy.Process.Pid); err != nil {
		t.Fatal(err)
	}
	st := read(t, fmt.Sprintf("/proc/%d/status", busy.Process.Pid))
	if !strings.Contains(st, "Cpus_allowed_list:\t"+first+"\n") {
		t.Fatalf("Cpus_allowed_list not %s:\n%s", first, st)
	}
	if err := w.SetCpuset(ctx, tg, "0-4095", ""); !errors.Is(err, ErrInvalid) {
		t.Fatal(err)
	}
	if err := w.SetCpuset(ctx, tg, "1-0", ""); !errors.Is(err, ErrInvalid) {
		t.Fatal(err)
	}
	fileIs(t, filepath.Join(tg.Cpuset.Path, "cpuset.cpus"), first)
	if err := w.SetCpuset(ctx, tg, parentCpus, ""); err != nil {
		t.Fatal(err)
	}
	st = read(t, fmt.Sprintf("/proc/%d/status", busy.Process.Pid))
	if !strings.Contains(st, "Cpus_allowed_list:\t"+parentCpus+"\n") {
		t.Fatalf("Cpus_allowed_list not widened to %s", parentCpus)
	}
}

func minKey(m map[int]bool) int {
	k := -1
	for i := range m {
		if k < 0 || i < k {
			k = i
		}
	}
	return k
}

func TestV1Memory(t *testing.T) {
	_, o, tg := v1Setup(t, "memory")
	ctx := context.Background()
	w := New(Paths{Sys: "/sys"})
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(), helperEnv+"=mem:64")
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	start(t, cmd)
	if err := o.AddPID(cmd.Process.Pid); err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(stdin, "go\n"); err != nil {
		t.Fatal(err)
	}
	if line, err := bufio.NewReader(stdout).ReadString('\n'); err != nil || line != "ready\n" {
		t.Fatalf("helper: %q %v", line, err)
	}
	limitFile := filepath.Join(tg.Memory.Path, "memory.limit_in_bytes")
	before := read(t, limitFile)
	s, err := w.Read(ctx, tg)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("usage after touching 64 MiB: %d MiB", s.MemUsage>>20)
	if s.MemUsage < 64<<20 {
		t.Fatalf("usage %d < 64 MiB: helper not charged here", s.MemUsage)
	}
	page := int64(os.Getpagesize())
	low := (s.MemUsage + 32<<20) / page * page
	if err := w.SetMemory(ctx, tg, Memory{Max: low, Soft: -1}); !errors.Is(err, ErrBelowUsage) {
		t.Fatalf("limit below usage+margin: %v", err)
	}
	fileIs(t, limitFile, before)
	okMax := (s.MemUsage + 128<<20) / page * page
	okSoft := (s.MemUsage + 64<<20) / page * page
	if err := w.SetMemory(ctx, tg, Memory{Max: okMax, Soft: okSoft}); err != nil {
		t.Fatal(err)
	}
	fileIs(t, limitFile, strconv.FormatInt(okMax, 10))
	fileIs(t, filepath.Join(tg.Memory.Path, "memory.soft_limit_in_bytes"), strconv.FormatInt(okSoft, 10))
	time.Sleep(200 * time.Millisecond)
	s, err = w.Read(ctx, tg)
	if err != nil || s.MemMax != okMax || s.MemSoft != okSoft || s.MemUsage > okMax {
		t.Fatalf("Read %+v %v", s, err)
	}
	if err := w.SetMemory(ctx, tg, Memory{Max: -1, Soft: -1}); err != nil {
		t.Fatal(err)
	}
	if s, _ := w.Read(ctx, tg); s.MemMax != -1 || s.MemSoft != -1 {
		t.Fatalf("unlimit: %+v", s)
	}
	stdin.Close()
}

func TestV1BlockIO(t *testing.T) {
	testutil.RequirePrivileged(t)
	testutil.RequireCommand(t, "losetup")
	testutil.RequireCommand(t, "dd")
	img := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 64<<20); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("losetup", "-f", "--show", img).CombinedOutput()
	if err != nil {
		testutil.SkipOrFail(t, fmt.Sprintf("losetup: %v %s", err, out))
	}
	loop := strings.TrimSpace(string(out))
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "-d", loop).CombinedOutput(); err != nil {
			t.Errorf("losetup -d %s: %v %s", loop, err, out)
		}
	})
	_, _, tg := v1Setup(t, "blkio")
	dev := read(t, filepath.Join("/sys/block", filepath.Base(loop), "dev"))
	ctx := context.Background()
	w := New(Paths{Sys: "/sys"})
	const rate = 8 << 20
	if err := w.SetBlockIO(ctx, tg, dev, IOLimit{WBps: rate}); err != nil {
		t.Fatal(err)
	}
	fileIs(t, filepath.Join(tg.BlkIO.Path, "blkio.throttle.write_bps_device"), dev+" "+strconv.Itoa(rate))
	s, err := w.Read(ctx, tg)
	if err != nil || s.IO[dev] != (IOLimit{WBps: rate}) {
		t.Fatalf("Read %+v %v", s.IO, err)
	}
	const mib = 24
	script := fmt.Sprintf("echo $$ > %s/cgroup.procs && exec dd if=/dev/zero of=%s bs=1M count=%d oflag=direct status=none",
		tg.BlkIO.Path, loop, mib)
	t0 := time.Now()
	if out, err := exec.Command("sh", "-c", script).CombinedOutput(); err != nil {
		t.Fatalf("dd: %v %s", err, out)
	}
	el := time.Since(t0).Seconds()
	got := float64(mib<<20) / el
	t.Logf("dd %d MiB under %d MiB/s: %.2f s = %.2f MiB/s", mib, rate>>20, el, got/(1<<20))
	if got < 0.8*rate || got > 1.2*rate {
		t.Fatalf("write rate %.2f MiB/s not within ±20%% of %d MiB/s", got/(1<<20), rate>>20)
	}
	if err := w.SetBlockIO(ctx, tg, dev, IOLimit{}); err != nil {
		t.Fatal(err)
	}
	if s, _ := w.Read(ctx, tg); len(s.IO) != 0 {
		t.Fatalf("limits not removed: %+v", s.IO)
	}
	if err := w.SetBlockIO(ctx, tg, "7:12345", IOLimit{WBps: 1}); !errors.Is(err, ErrInvalid) {
		t.Fatal(err)
	}
}

// BenchmarkV1SetCPU is the cost of one SetCPU that changes the quota only
// (one cgroup write via containerd/cgroups plus the read of the old values).
func BenchmarkV1SetCPU(b *testing.B) {
	_, _, tg := v1Setup(b, "cpu")
	w := New(Paths{Sys: "/sys"})
	ctx := context.Background()
	for i := 0; b.Loop(); i++ {
		if err := w.SetCPU(ctx, tg, int64(20000+i%2*10000), 100000); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkV1RawWrite is one bare write of cpu.cfs_quota_us, for comparison.
func BenchmarkV1RawWrite(b *testing.B) {
	_, _, tg := v1Setup(b, "cpu")
	p := filepath.Join(tg.CPU.Path, "cpu.cfs_quota_us")
	for i := 0; b.Loop(); i++ {
		if err := cgroups.WriteFile(p, strconv.Itoa(20000+i%2*10000)); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkV1SetMemory is one SetMemory (usage read + limit and soft writes).
func BenchmarkV1SetMemory(b *testing.B) {
	_, _, tg := v1Setup(b, "memory")
	w := New(Paths{Sys: "/sys"})
	ctx := context.Background()
	for i := 0; b.Loop(); i++ {
		if err := w.SetMemory(ctx, tg, Memory{Max: int64(512+i%2*64) << 20, Soft: -1}); err != nil {
			b.Fatal(err)
		}
	}
}
