package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ars-dev/ars/agent/cgroups"
	"github.com/ars-dev/ars/agent/config"
	"github.com/ars-dev/ars/internal/testutil"
	"github.com/ars-dev/ars/internal/vmtest"
)

// TestDemoRunsAndCleansUp runs what `make demo` runs, with short phases:
// it must succeed (arsd raised the busy VM's allocation and lowered it
// again) and leave no QEMU process, cgroup or socket behind. It uses the
// embedded defaults, so it needs /run/ars/qmp empty and :9464 free, and
// its arsd appends to the default audit log (/var/lib/ars/audit.log).
func TestDemoRunsAndCleansUp(t *testing.T) {
	testutil.RequireBTF(t)
	guestDir := vmtest.GuestDir(t)
	if others, _ := filepath.Glob(filepath.Join(config.Default().QMPDir, "*.sock")); len(others) > 0 {
		t.Fatalf("%s holds sockets already (%v); the demo refuses to run beside other VMs", config.Default().QMPDir, others)
	}
	work := t.TempDir()
	demo := build(t, "./cmd/ars-demo", work)
	arsd := build(t, "./cmd/arsd", work)
	out, err := exec.Command(demo, "--arsd", arsd, "--guest", guestDir, "--idle", "10s", "--busy", "45s").CombinedOutput()
	t.Logf("demo output (tail):\n%s", tail(string(out), 12))
	if err != nil {
		t.Fatalf("demo failed: %v", err)
	}
	for _, want := range []string{"summary for demo-busy", "first raise after", "cleaned up"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("demo output lacks %q", want)
		}
	}
	// Nothing left: QEMU processes named demo-*, cgroups, sockets.
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, _ := os.ReadFile(p)
		if strings.Contains(string(b), "guest=demo-") {
			t.Errorf("demo QEMU left running: %s", p)
		}
	}
	host, err := cgroups.Detect(cgroups.DefaultPaths())
	if err != nil {
		t.Fatal(err)
	}
	self, _ := host.MembershipOf(0)
	for c, mnt := range host.V1 {
		left, _ := filepath.Glob(filepath.Join(mnt, self[c], "ars-demo-*"))
		if len(left) > 0 {
			t.Errorf("%s cgroups left: %v", c, left)
		}
	}
	if left, _ := filepath.Glob(filepath.Join(config.Default().QMPDir, "demo-*.sock")); len(left) > 0 {
		t.Errorf("sockets left: %v", left)
	}
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
