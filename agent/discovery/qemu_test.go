package discovery

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ars-dev/ars/agent/cgroups"
	"github.com/ars-dev/ars/agent/qmp"
	"github.com/ars-dev/ars/agent/qmp/qmptest"
	"github.com/ars-dev/ars/internal/testutil"
)

// TestDiscoveryRealQEMU: two bare QEMUs and a stale socket in one directory.
func TestDiscoveryRealQEMU(t *testing.T) {
	testutil.RequirePrivileged(t)
	host, err := cgroups.Detect(cgroups.DefaultPaths())
	if err != nil {
		t.Fatal(err)
	}
	// vm-b lives in a cgroup of its own beneath ours, so the cgroup check
	// distinguishes it from vm-a (which inherits the test's cgroup).
	owned, err := host.CreateUnderSelf(fmt.Sprintf("ars-discovery-test-%d", os.Getpid()), "cpu", "cpuacct")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := owned.Remove(); err != nil {
			t.Error(err)
		}
	}) // registered first: runs after the QEMUs are killed

	dir := t.TempDir()
	qa := qmptest.StartQEMU(t, filepath.Join(dir, "vm-a.sock"), "1,maxcpus=2")
	qb := qmptest.StartQEMU(t, filepath.Join(dir, "vm-b.sock"), "2,maxcpus=2")
	if err := owned.AddPID(qb.PID); err != nil {
		t.Fatal(err)
	}
	staleSocket(t, filepath.Join(dir, "vm-stale.sock"))

	o := Options{QMP: qmp.Options{Timeout: 10 * time.Second}}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	start := time.Now()
	vms, errs := Scan(ctx, dir, host, o)
	t.Logf("Scan of 3 sockets: %v", time.Since(start))
	if len(vms) != 2 || vms[0].Name != "vm-a" || vms[1].Name != "vm-b" {
		CloseAll(vms)
		t.Fatalf("vms = %+v, errs = %v", vms, errs)
	}
	if len(errs) != 1 || !strings.Contains(errs[0].Error(), "vm-stale.sock") || !strings.Contains(errs[0].Error(), "connection refused") {
		t.Errorf("errs = %v, want one for vm-stale.sock", errs)
	} else {
		t.Logf("stale: %v", errs[0])
	}
	for i, q := range []*qmptest.QEMU{qa, qb} {
		checkRealVM(t, host, vms[i], q, i+1)
	}
	if vms[1].Cgroup.CPU != owned.Dirs["cpu"] || vms[1].Cgroup.CPUAcct != owned.Dirs["cpuacct"] {
		t.Errorf("vm-b cgroup %+v, want the test cgroup %v", vms[1].Cgroup, owned.Dirs)
	}
	if vms[0].Cgroup.CPU == vms[1].Cgroup.CPU {
		t.Errorf("vm-a and vm-b share cgroup %s", vms[0].Cgroup.CPU)
	}
	CloseAll(vms)

	// The Watcher: same VMs (QEMU accepts a new client once the old one
	// has gone), then killing vm-a drops it on the next Refresh.
	w := NewWatcher(dir, host, o)
	t.Cleanup(func() { w.Close() })
	ch := w.Refresh(ctx)
	if names(ch.Added) != "vm-a,vm-b" || len(ch.Errors) != 1 {
		t.Fatalf("first refresh: added %s, errors %v", names(ch.Added), ch.Errors)
	}
	for i, q := range []*qmptest.QEMU{qa, qb} {
		checkRealVM(t, host, ch.Added[i], q, i+1)
	}
	ch = w.Refresh(ctx)
	if len(ch.Added)+len(ch.Removed)+len(ch.Updated) != 0 {
		t.Errorf("idle refresh changed: %+v", ch)
	}
	qa.Kill()
	start = time.Now()
	ch = w.Refresh(ctx)
	t.Logf("Refresh after kill: %v", time.Since(start))
	if names(ch.Removed) != "vm-a" || len(ch.Added) != 0 {
		t.Fatalf("after killing vm-a: removed %s added %s", names(ch.Removed), names(ch.Added))
	}
	if names(w.VMs()) != "vm-b" {
		t.Errorf("held after kill: %s", names(w.VMs()))
	}
	// vm-a's socket file is now stale and reported as such.
	var sawA bool
	for _, e := range ch.Errors {
		var se *SocketError
		if errors.As(e, &se) && se.Name == "vm-a" {
			sawA = true
		}
	}
	if !sawA {
		t.Errorf("vm-a's leftover socket not reported: %v", ch.Errors)
	}
	// The survivor's monitor still works.
	vm, _ := w.Get("vm-b")
	if st, err := vm.Monitor.QueryStatus(ctx); err != nil || st.Running {
		t.Errorf("vm-b status %+v, %v", st, err)
	}
}

func checkRealVM(t *testing.T, host *cgroups.Host, vm VM, q *qmptest.QEMU, nCPU int) {
	t.Helper()
	if vm.PID != q.PID {
		t.Errorf("%s: PID %d, want child %d", vm.Name, vm.PID, q.PID)
	}
	if len(vm.VCPUs) != nCPU {
		t.Errorf("%s: %d vCPUs, want %d", vm.Name, len(vm.VCPUs), nCPU)
	}
	threads, err := q.Threads()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range vm.VCPUs {
		if !slices.Contains(threads, strconv.Itoa(c.TID)) || c.TID == q.PID {
			t.Errorf("%s: vCPU %d TID %d not among the threads %v of pid %d", vm.Name, c.Index, c.TID, threads, q.PID)
		}
	}
	// Cross-check with the kernel: /proc/PID/cgroup, and cgroup.procs of
	// the directory we returned lists the PID.
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", q.PID))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		f := strings.SplitN(line, ":", 3)
		if slices.Contains(strings.Split(f[1], ","), "cpu") {
			if want := filepath.Join(host.V1["cpu"], f[2]); vm.Cgroup.CPU != want {
				t.Errorf("%s: cgroup CPU %s, /proc says %s", vm.Name, vm.Cgroup.CPU, want)
			}
		}
	}
	procs, err := os.ReadFile(filepath.Join(vm.Cgroup.CPU, "cgroup.procs"))
	if err != nil {
		t.Errorf("%s: %v", vm.Name, err)
	} else if !slices.Contains(strings.Fields(string(procs)), strconv.Itoa(q.PID)) {
		t.Errorf("%s: pid %d not in %s/cgroup.procs", vm.Name, q.PID, vm.Cgroup.CPU)
	}
	if len(vm.Cmdline) == 0 || !slices.Contains(vm.Cmdline, "-qmp") || !strings.HasPrefix(filepath.Base(vm.Exe), "qemu") {
		t.Errorf("%s: cmdline %q exe %q", vm.Name, vm.Cmdline, vm.Exe)
	}
	t.Logf("%s: pid %d vcpus %+v cgroup %s", vm.Name, vm.PID, vm.VCPUs, vm.Cgroup.CPU)
}
