package discovery

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ars-dev/ars/agent/cgroups"
	"github.com/ars-dev/ars/agent/qmp"
	"github.com/ars-dev/ars/agent/qmp/qmptest"
)

// procFixture builds a fake /proc in which this test process (the PID the
// fake QMP servers' sockets report) looks like a QEMU with the given
// threads, in cgroup /machine/<cg>.
type procFixture struct {
	root, pidDir string
	cpuMount     string
}

func newProcFixture(t *testing.T, comm, exe, cg string, tids ...int) *procFixture {
	t.Helper()
	root := t.TempDir()
	pf := &procFixture{root: root, pidDir: filepath.Join(root, strconv.Itoa(os.Getpid())), cpuMount: "/sys/fs/cgroup/cpu,cpuacct"}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(root, "self"), 0o755))
	must(os.WriteFile(filepath.Join(root, "self", "mountinfo"), []byte(
		"25 30 0:22 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755\n"+
			"31 25 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate\n"+
			"33 25 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:12 - cgroup cgroup rw,cpu,cpuacct\n"+
			"34 25 0:30 / /sys/fs/cgroup/memory rw,nosuid shared:13 - cgroup cgroup rw,memory\n"), 0o644))
	must(os.MkdirAll(filepath.Join(pf.pidDir, "task"), 0o755))
	must(os.WriteFile(filepath.Join(pf.pidDir, "comm"), []byte(comm+"\n"), 0o644))
	if exe != "" {
		must(os.Symlink(exe, filepath.Join(pf.pidDir, "exe")))
	}
	must(os.WriteFile(filepath.Join(pf.pidDir, "cmdline"), []byte("qemu-system-x86_64\x00-name\x00"+cg+"\x00-qmp\x00unix:x\x00"), 0o644))
	must(os.WriteFile(filepath.Join(pf.pidDir, "cgroup"), []byte(
		"5:memory:/user.slice/session-1.scope\n4:cpu,cpuacct:/machine/"+cg+"\n0::/machine/"+cg+"\n"), 0o644))
	for _, tid := range tids {
		pf.addThread(t, tid)
	}
	return pf
}

func (pf *procFixture) addThread(t *testing.T, tid int) {
	if err := os.MkdirAll(filepath.Join(pf.pidDir, "task", strconv.Itoa(tid)), 0o755); err != nil {
		t.Fatal(err)
	}
}

func (pf *procFixture) host(t *testing.T) *cgroups.Host {
	h, err := cgroups.Detect(cgroups.Paths{Proc: pf.root})
	if err != nil {
		t.Fatal(err)
	}
	return h
}

func cpusJSON(tids ...int) string {
	var parts []string
	for i, tid := range tids {
		parts = append(parts, fmt.Sprintf(`{"cpu-index": %d, "qom-path": "/machine/unattached/device[%d]", "thread-id": %d, "target": "x86_64", "props": {"socket-id": 0, "core-id": %d, "thread-id": 0}}`, i, i, tid, i))
	}
	return "[" + strings.Join(parts, ", ") + "]"
}

// fakeVM serves query-cpus-fast with the thread ids in *tids.
func fakeVM(t *testing.T, path string, tids *atomic.Value) *qmptest.Fake {
	return qmptest.Listen(t, path, func(c *qmptest.Conn) {
		if c.Handshake() != nil {
			return
		}
		c.Serve(func(cmd qmptest.Cmd) (string, error) {
			if cmd.Execute == "query-cpus-fast" {
				return cpusJSON(tids.Load().([]int)...), nil
			}
			return "", fmt.Errorf("unexpected %s", cmd.Execute)
		})
	})
}

func staleSocket(t *testing.T, path string) {
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close()
}

func tidsOf(ts ...int) *atomic.Value {
	var v atomic.Value
	v.Store(ts)
	return &v
}

func opts(pf *procFixture) Options {
	return Options{Paths: Paths{Proc: pf.root}, QMP: qmp.Options{Timeout: 2 * time.Second}}
}

func TestScanFixture(t *testing.T) {
	pf := newProcFixture(t, "qemu-system-x86", "/usr/bin/qemu-system-x86_64", "vm", 1001, 1002, 2001)
	dir := t.TempDir()
	fakeVM(t, filepath.Join(dir, "vm-b.sock"), tidsOf(2001))
	fakeVM(t, filepath.Join(dir, "vm-a.sock"), tidsOf(1002, 1001))
	staleSocket(t, filepath.Join(dir, "gone.sock"))
	os.WriteFile(filepath.Join(dir, "file.sock"), []byte("x"), 0o644)
	os.Symlink(filepath.Join(dir, "vm-a.sock"), filepath.Join(dir, "link.sock"))
	os.WriteFile(filepath.Join(dir, "README"), []byte("ignored"), 0o644)

	vms, errs := Scan(context.Background(), dir, pf.host(t), opts(pf))
	defer CloseAll(vms)
	if len(vms) != 2 || vms[0].Name != "vm-a" || vms[1].Name != "vm-b" {
		t.Fatalf("vms = %+v", vms)
	}
	a := vms[0]
	if a.PID != os.Getpid() || a.UID != os.Getuid() || a.Socket != filepath.Join(dir, "vm-a.sock") {
		t.Errorf("vm-a = %+v", a)
	}
	wantCPUs := []VCPU{{0, 1002, "/machine/unattached/device[0]"}, {1, 1001, "/machine/unattached/device[1]"}}
	if fmt.Sprint(a.VCPUs) != fmt.Sprint(wantCPUs) {
		t.Errorf("vCPUs = %+v, want %+v", a.VCPUs, wantCPUs)
	}
	if a.Cgroup.CPU != "/sys/fs/cgroup/cpu,cpuacct/machine/vm" || a.Cgroup.CPUAcct != a.Cgroup.CPU || a.Cgroup.CPUVersion != cgroups.V1 {
		t.Errorf("cgroup = %+v", a.Cgroup)
	}
	if len(a.Cmdline) != 5 || a.Cmdline[3] != "-qmp" || a.Exe != "/usr/bin/qemu-system-x86_64" {
		t.Errorf("cmdline %q exe %q", a.Cmdline, a.Exe)
	}
	if a.Monitor == nil || a.Monitor.Err() != nil {
		t.Error("monitor should be open and owned by the caller")
	}

	wantErr := map[string]string{
		"file": "not a unix socket",
		"gone": "connection refused",
		"link": "symbolic link",
	}
	if len(errs) != len(wantErr) {
		t.Fatalf("errors = %v, want %d", errs, len(wantErr))
	}
	for i, name := range []string{"file", "gone", "link"} {
		var se *SocketError
		if !errors.As(errs[i], &se) || se.Name != name || !strings.Contains(errs[i].Error(), wantErr[name]) || !strings.Contains(errs[i].Error(), name+".sock") {
			t.Errorf("error %d = %v, want one for %s.sock mentioning %q", i, errs[i], name, wantErr[name])
		}
	}
}

func TestScanNotQEMU(t *testing.T) {
	pf := newProcFixture(t, "python3", "/usr/bin/python3.11", "vm", 1001)
	dir := t.TempDir()
	fakeVM(t, filepath.Join(dir, "impostor.sock"), tidsOf(1001))
	vms, errs := Scan(context.Background(), dir, nil, opts(pf))
	CloseAll(vms)
	if len(vms) != 0 || len(errs) != 1 || !errors.Is(errs[0], ErrNotQEMU) ||
		!strings.Contains(errs[0].Error(), `comm "python3"`) || !strings.Contains(errs[0].Error(), "impostor.sock") {
		t.Fatalf("vms %v errs %v, want one ErrNotQEMU naming the socket and comm", vms, errs)
	}
	// A renamed QEMU (-name process=...) still passes through its exe.
	pf2 := newProcFixture(t, "my-vm", "/usr/bin/qemu-system-x86_64", "vm", 1001)
	vms, errs = Scan(context.Background(), dir, nil, opts(pf2))
	CloseAll(vms)
	if len(vms) != 1 || len(errs) != 0 {
		t.Errorf("renamed qemu: vms %v errs %v", vms, errs)
	}
}

func TestScanForeignThread(t *testing.T) {
	pf := newProcFixture(t, "qemu-system-x86", "", "vm", 1001)
	dir := t.TempDir()
	fakeVM(t, filepath.Join(dir, "vm.sock"), tidsOf(1001, 9999)) // 9999 is not ours
	vms, errs := Scan(context.Background(), dir, nil, opts(pf))
	CloseAll(vms)
	if len(vms) != 0 || len(errs) != 1 || !strings.Contains(errs[0].Error(), "thread 9999 is not a thread of pid") {
		t.Fatalf("vms %v errs %v", vms, errs)
	}
}

func TestScanMissingDir(t *testing.T) {
	vms, errs := Scan(context.Background(), filepath.Join(t.TempDir(), "nope"), nil, Options{})
	if vms != nil || len(errs) != 1 || !errors.Is(errs[0], os.ErrNotExist) {
		t.Fatalf("vms %v errs %v", vms, errs)
	}
}

func TestScanHungSocketDoesNotSerialize(t *testing.T) {
	pf := newProcFixture(t, "qemu-system-x86", "", "vm", 1001)
	dir := t.TempDir()
	for i := 0; i < 3; i++ { // accept but never greet, like a QEMU with another client
		qmptest.Listen(t, filepath.Join(dir, fmt.Sprintf("hung%d.sock", i)), func(c *qmptest.Conn) { c.Recv() })
	}
	fakeVM(t, filepath.Join(dir, "ok.sock"), tidsOf(1001))
	o := opts(pf)
	o.QMP.Timeout = 500 * time.Millisecond
	start := time.Now()
	vms, errs := Scan(context.Background(), dir, nil, o)
	CloseAll(vms)
	if d := time.Since(start); d > 1200*time.Millisecond { // serial would be ≥ 1.5s
		t.Errorf("scan took %v; hung sockets must be probed in parallel", d)
	}
	if len(vms) != 1 || vms[0].Name != "ok" || len(errs) != 3 {
		t.Fatalf("vms %v errs %v", vms, errs)
	}
	for _, e := range errs {
		if !errors.Is(e, context.DeadlineExceeded) {
			t.Errorf("hung socket error %v", e)
		}
	}
}

func TestWatcherFixture(t *testing.T) {
	pf := newProcFixture(t, "qemu-system-x86", "", "vm", 1001, 2001)
	dir := t.TempDir()
	aTIDs := tidsOf(1001)
	fakeVM(t, filepath.Join(dir, "a.sock"), aTIDs)
	fb := fakeVM(t, filepath.Join(dir, "b.sock"), tidsOf(2001))
	staleSocket(t, filepath.Join(dir, "stale.sock"))

	w := NewWatcher(dir, pf.host(t), opts(pf))
	defer w.Close()
	ctx := context.Background()
	ch := w.Refresh(ctx)
	if names(ch.Added) != "a,b" || len(ch.Removed) != 0 || len(ch.Errors) != 1 {
		t.Fatalf("first refresh %+v", ch)
	}
	// Nothing changed: nothing reported, no redial (a fake serves one
	// connection per accept; a redial would show as a second Added).
	ch = w.Refresh(ctx)
	if len(ch.Added)+len(ch.Removed)+len(ch.Updated) != 0 || len(ch.Errors) != 1 {
		t.Fatalf("idle refresh %+v", ch)
	}
	// vCPU hotplug on a.
	pf.addThread(t, 1002)
	aTIDs.Store([]int{1001, 1002})
	ch = w.Refresh(ctx)
	if names(ch.Updated) != "a" || len(ch.Updated[0].VCPUs) != 2 {
		t.Fatalf("hotplug refresh %+v", ch)
	}
	if vm, _ := w.Get("a"); len(vm.VCPUs) != 2 {
		t.Errorf("held a has %d vCPUs", len(vm.VCPUs))
	}
	// b's QEMU goes away (connection closed, socket file left behind).
	fb.Close()
	ch = w.Refresh(ctx)
	if names(ch.Removed) != "b" || len(ch.Added) != 0 {
		t.Fatalf("after b died %+v", ch)
	}
	if ch.Removed[0].Monitor.Err() == nil {
		t.Error("removed VM's monitor should be closed")
	}
	if names(w.VMs()) != "a" {
		t.Errorf("held %s", names(w.VMs()))
	}
	// b's socket is now stale: reported as an error, not as a VM.
	if len(ch.Errors) != 2 {
		t.Errorf("errors %v", ch.Errors)
	}
	// A new VM appears; a's socket file is removed.
	fakeVM(t, filepath.Join(dir, "c.sock"), tidsOf(1001))
	os.Remove(filepath.Join(dir, "a.sock"))
	ch = w.Refresh(ctx)
	if names(ch.Added) != "c" || names(ch.Removed) != "a" {
		t.Fatalf("after c appeared and a's socket was removed %+v", ch)
	}
	if names(w.VMs()) != "c" {
		t.Errorf("held %s", names(w.VMs()))
	}
}

func names(vms []VM) string {
	var n []string
	for _, vm := range vms {
		n = append(n, vm.Name)
	}
	return strings.Join(n, ",")
}
