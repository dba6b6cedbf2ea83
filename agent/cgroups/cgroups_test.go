package cgroups

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ars-dev/ars/internal/testutil"
)

// hybridMountinfo is this project's CI host: v1 controllers plus an empty
// cgroup2 mount, with one escaped mount point.
const hybridMountinfo = `25 30 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw
32 25 0:27 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
33 32 0:28 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
35 32 0:30 / /sys/fs/cgroup/cpu rw,nosuid shared:13 - cgroup cgroup rw,cpu
36 32 0:31 / /sys/fs/cgroup/cpuacct rw,nosuid shared:14 - cgroup cgroup rw,cpuacct
37 32 0:32 / /sys/fs/cgroup/mem\040ory rw,nosuid shared:15 - cgroup cgroup rw,memory
38 32 0:33 / /sys/fs/cgroup/systemd rw,nosuid shared:16 - cgroup cgroup rw,xattr,name=systemd
`

func fixture(t *testing.T, mountinfo, selfCgroup string) Paths {
	t.Helper()
	proc := t.TempDir()
	if err := os.MkdirAll(filepath.Join(proc, "self"), 0o755); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(proc, "self", "mountinfo"), []byte(mountinfo), 0o644)
	os.WriteFile(filepath.Join(proc, "self", "cgroup"), []byte(selfCgroup), 0o644)
	return Paths{Proc: proc}
}

func TestDetectHybrid(t *testing.T) {
	h, err := Detect(fixture(t, hybridMountinfo, ""))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"cpu": "/sys/fs/cgroup/cpu", "cpuacct": "/sys/fs/cgroup/cpuacct", "memory": "/sys/fs/cgroup/mem ory"}
	for c, m := range want {
		if h.V1[c] != m || h.VersionOf(c) != V1 {
			t.Errorf("%s: mount %q version %v, want %q v1", c, h.V1[c], h.VersionOf(c), m)
		}
	}
	if _, ok := h.V1["xattr"]; ok {
		t.Error("mount option taken for a controller")
	}
	if h.Unified != "/sys/fs/cgroup/unified" || h.VersionOf("io") != None {
		t.Errorf("unified %q, io %v", h.Unified, h.VersionOf("io"))
	}
}

func TestDetectNone(t *testing.T) {
	if _, err := Detect(fixture(t, "25 30 0:23 / /sys rw - sysfs sysfs rw\n", "")); err == nil {
		t.Fatal("no cgroup mounts accepted")
	}
}

func TestMembershipAndDir(t *testing.T) {
	p := fixture(t, hybridMountinfo, "9:name=systemd:/\n4:memory:/sess/a\n2:cpu,cpuacct:/vm1\n0::/\n")
	h, err := Detect(p)
	if err != nil {
		t.Fatal(err)
	}
	m, err := h.MembershipOf(0)
	if err != nil {
		t.Fatal(err)
	}
	if m["cpu"] != "/vm1" || m["cpuacct"] != "/vm1" || m["memory"] != "/sess/a" || m[""] != "/" {
		t.Fatalf("membership %v", m)
	}
	g, err := h.groupFrom(m)
	if err != nil {
		t.Fatal(err)
	}
	if g.CPU != "/sys/fs/cgroup/cpu/vm1" || g.CPUAcct != "/sys/fs/cgroup/cpuacct/vm1" || g.CPUVersion != V1 {
		t.Fatalf("group %+v", g)
	}
	if _, err := ParseMembership("garbage\n"); err == nil {
		t.Fatal("malformed /proc/PID/cgroup accepted")
	}
}

func TestV2ReadAndWrite(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "cpu.max"), []byte("max 100000\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "cpu.stat"), []byte("usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 10\nnr_throttled 3\nthrottled_usec 7\n"), 0o644)
	g := Group{CPU: dir, CPUAcct: dir, CPUVersion: V2}
	s, err := ReadCPU(g)
	if err != nil {
		t.Fatal(err)
	}
	if s.UsageNs != 1_500_000 || s.Periods != 10 || s.Throttled != 3 || s.ThrottledNs != 7000 || s.QuotaUs != -1 || s.PeriodUs != 100000 {
		t.Fatalf("stat %+v", s)
	}
	if err := WriteQuota(g, 25000); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "cpu.max")); string(b) != "25000 100000" {
		t.Fatalf("cpu.max = %q", b)
	}
	if err := WriteQuota(g, -1); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "cpu.max")); string(b) != "max 100000" {
		t.Fatalf("cpu.max = %q", b)
	}
}

func TestParseCPUMax(t *testing.T) {
	for in, ok := range map[string]bool{"max 100000": true, "5000 10000\n": true, "0 100000": false,
		"max": false, "x 100": false, "100 0": false, "-5 100": false, "": false} {
		if _, _, err := ParseCPUMax(in); (err == nil) != ok {
			t.Errorf("ParseCPUMax(%q) err=%v, want ok=%v", in, err, ok)
		}
	}
}

// TestRealCgroupAccounting creates a cgroup under our own, moves a child
// that spins into it and checks usage against the child's own schedstat.
func TestRealCgroupAccounting(t *testing.T) {
	testutil.RequirePrivileged(t)
	h, err := Detect(DefaultPaths())
	if err != nil {
		t.Fatal(err)
	}
	o, err := h.CreateUnderSelf("ars-cg-test-"+strconv.Itoa(os.Getpid()), "cpu", "cpuacct")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := o.Remove(); err != nil {
			t.Error(err)
		}
	})
	self, _ := h.MembershipOf(0)
	for c, rel := range o.Rel {
		if !strings.HasPrefix(rel, strings.TrimSuffix(self[c], "/")+"/") {
			t.Fatalf("%s cgroup %s is not under our own %s", c, rel, self[c])
		}
	}
	proc, err := os.StartProcess("/bin/sh", []string{"sh", "-c", "while :; do :; done"}, &os.ProcAttr{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { proc.Kill(); proc.Wait() })
	if err := o.AddPID(proc.Pid); err != nil {
		t.Fatal(err)
	}
	g, err := o.Group()
	if err != nil {
		t.Fatal(err)
	}
	if got, err := h.GroupOf(proc.Pid); err != nil || got != g {
		t.Fatalf("GroupOf(child) = %+v, %v; want %+v", got, err, g)
	}
	if err := WriteQuota(g, 30000); err != nil { // 0.3 core
		t.Fatal(err)
	}
	s0, _ := ReadCPU(g)
	time.Sleep(2 * time.Second)
	s1, err := ReadCPU(g)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(proc.Pid) + "/schedstat")
	if err != nil {
		t.Fatal(err)
	}
	onCPU, _ := strconv.ParseUint(strings.Fields(string(b))[0], 10, 64)
	rate := float64(s1.UsageNs-s0.UsageNs) / 2e9
	if rate < 0.2 || rate > 0.4 {
		t.Fatalf("usage %.2f cores under a 0.3-core quota", rate)
	}
	if s1.Throttled <= s0.Throttled || s1.QuotaUs != 30000 {
		t.Fatalf("no throttling recorded: %+v → %+v", s0, s1)
	}
	// The cgroup's total is the child's own on-CPU time (its only task).
	if d := float64(s1.UsageNs) - float64(onCPU); d < -50e6 || d > 50e6 {
		t.Fatalf("cgroup usage %d ns vs child's schedstat %d ns", s1.UsageNs, onCPU)
	}
}
