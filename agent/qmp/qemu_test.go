package qmp_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/ars-dev/ars/agent/qmp"
	"github.com/ars-dev/ars/agent/qmp/qmptest"
	"github.com/ars-dev/ars/internal/testutil"
	"github.com/digitalocean/go-qemu/qmp/raw"
)

// TestRealQEMU talks to a bare QEMU 7.2 (TCG, no guest).
func TestRealQEMU(t *testing.T) {
	testutil.RequirePrivileged(t)
	dir := t.TempDir()
	sock := filepath.Join(dir, "q.sock")
	q := qmptest.StartQEMU(t, sock, "1,maxcpus=2")

	link := filepath.Join(dir, "link.sock")
	if err := os.Symlink(sock, link); err != nil {
		t.Fatal(err)
	}
	if _, err := qmp.Dial(ctxT(t, 5*time.Second), link, qmp.Options{}); !errors.Is(err, qmp.ErrSymlink) {
		t.Fatalf("symlinked socket: err = %v, want ErrSymlink", err)
	}
	if _, err := qmp.Dial(ctxT(t, 5*time.Second), sock, qmp.Options{ExpectPID: q.PID + 1}); !errors.Is(err, qmp.ErrPeerMismatch) {
		t.Fatalf("wrong expected pid: err = %v, want ErrPeerMismatch", err)
	}

	start := time.Now()
	m, err := qmp.Dial(ctxT(t, 10*time.Second), sock, qmp.Options{ExpectPID: q.PID})
	if err != nil {
		t.Fatalf("Dial: %v\nqemu log: %s", err, q.LogText())
	}
	t.Cleanup(func() { m.Close() })
	t.Logf("dial+handshake %v; QEMU %s", time.Since(start), m.Greeting().Version)
	if m.PeerPID() != q.PID {
		t.Fatalf("PeerPID = %d, want child pid %d", m.PeerPID(), q.PID)
	}
	if m.PeerUID() != os.Getuid() {
		t.Errorf("PeerUID = %d, want %d", m.PeerUID(), os.Getuid())
	}
	if m.Greeting().Version.QEMU.Major < 2 {
		t.Errorf("greeting %+v", m.Greeting())
	}

	// go-qemu's generated API on top of our Monitor.
	rm := raw.NewMonitor(m)
	st, err := rm.QueryStatus()
	if err != nil {
		t.Fatal(err)
	}
	if st.Running || st.Status != raw.RunStatePrelaunch {
		t.Errorf("status %+v, want prelaunch (-S)", st)
	}

	ctx := ctxT(t, 20*time.Second)
	start = time.Now()
	cpus, err := m.QueryCPUsFast(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("query-cpus-fast round trip %v", time.Since(start))
	if len(cpus) != 1 {
		t.Fatalf("cpus = %+v, want 1 (-smp 1)", cpus)
	}
	c := cpus[0]
	if c.CPUIndex != 0 || c.QOMPath == "" || c.ThreadID <= 0 || c.ThreadID == q.PID {
		t.Errorf("cpu %+v", c)
	}
	if _, err := os.Stat(fmt.Sprintf("/proc/%d/task/%d", q.PID, c.ThreadID)); err != nil {
		t.Errorf("vCPU thread %d is not a thread of qemu pid %d: %v", c.ThreadID, q.PID, err)
	}
	comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/comm", q.PID, c.ThreadID))
	t.Logf("vCPU 0 thread %d comm %q", c.ThreadID, comm)

	// Hot-pluggable slots exist (maxcpus=2).
	var hp []raw.HotpluggableCPU
	if err := m.Execute(ctx, "query-hotpluggable-cpus", nil, &hp); err != nil || len(hp) != 2 {
		t.Errorf("query-hotpluggable-cpus = %d entries, %v; want 2", len(hp), err)
	}

	// A real QMP error.
	err = m.Execute(ctx, "no-such-command", nil, nil)
	if !qmp.IsClass(err, "CommandNotFound") {
		t.Errorf("unknown command: %v", err)
	}
	err = m.Execute(ctx, "balloon", map[string]int64{"value": 1 << 27}, nil)
	var qe *qmp.Error
	if !errors.As(err, &qe) || qe.Desc == "" {
		t.Errorf("balloon without a balloon device: %v", err)
	} else {
		t.Logf("balloon error: %v", qe)
	}

	// Events: cont → RESUME, stop → STOP.
	evs, err := m.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := rm.Cont(); err != nil {
		t.Fatal(err)
	}
	if err := rm.Stop(); err != nil {
		t.Fatal(err)
	}
	want := []string{"RESUME", "STOP"}
	for _, w := range want {
		select {
		case ev := <-evs:
			if ev.Event != w {
				t.Errorf("event %s, want %s", ev.Event, w)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("no %s event", w)
		}
	}
	st, err = m.QueryStatus(ctx)
	if err != nil || st.Status != raw.RunStatePaused {
		t.Errorf("status after stop = %+v, %v; want paused", st, err)
	}

	// QEMU serves one client: a second Dial gets no greeting and says so.
	_, err = qmp.Dial(context.Background(), sock, qmp.Options{Timeout: 300 * time.Millisecond})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("second client: err = %v, want deadline exceeded", err)
	} else {
		t.Logf("second client: %v", err)
	}

	// QEMU dying fails calls promptly.
	q.Kill()
	select {
	case <-m.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("monitor did not notice QEMU exit")
	}
	start = time.Now()
	if _, err := m.QueryStatus(ctx); !errors.Is(err, qmp.ErrDisconnected) {
		t.Errorf("after kill: %v", err)
	} else {
		t.Logf("after kill (%v): %v", time.Since(start), err)
	}
}
