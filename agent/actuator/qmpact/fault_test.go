package qmpact_test

import (
	"context"
	"errors"
	"path/filepath"
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/ars-dev/ars/agent/actuator/qmpact"
	"github.com/ars-dev/ars/agent/qmp"
	"github.com/ars-dev/ars/agent/qmp/qmptest"
	"github.com/ars-dev/ars/internal/testutil"
)

// bareQEMU starts a QEMU with no guest (-S, 64 MiB, no balloon), killed by
// PID at cleanup.
func bareQEMU(t *testing.T) *qmptest.QEMU {
	t.Helper()
	testutil.RequirePrivileged(t)
	return qmptest.StartQEMU(t, filepath.Join(t.TempDir(), "q.sock"), "1,maxcpus=2")
}

// settleGoroutines waits until the goroutine count is back to at most n.
func settleGoroutines(t *testing.T, n int) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for runtime.NumGoroutine() > n && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if g := runtime.NumGoroutine(); g > n {
		buf := make([]byte, 1<<16)
		t.Errorf("goroutine leak: %d running, %d before\n%s", g, n, buf[:runtime.Stack(buf, true)])
	}
}

// TestStoppedQEMU: a SIGSTOPped QEMU makes its own commands fail by their
// deadline, while another VM's monitor keeps answering, and nothing leaks.
func TestStoppedQEMU(t *testing.T) {
	v := guest.Get(t)
	other, _ := connect(t, v)
	q := bareQEMU(t)
	ctx := ctxT(t, 30*time.Second)

	base := runtime.NumGoroutine()
	func() {
		r, err := qmpact.DialReconnecting(ctx, q.Socket, qmp.Options{ExpectPID: q.PID})
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		c, err := qmpact.NewController(ctx, r, qmpact.Options{CommandTimeout: 2 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()

		if err := syscall.Kill(q.PID, syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		stopped := true
		cont := func() {
			if stopped {
				syscall.Kill(q.PID, syscall.SIGCONT)
				stopped = false
			}
		}
		defer cont()

		// The context's deadline (500 ms) bounds the command ...
		start := time.Now()
		cctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
		_, err = c.HotplugCPUs(cctx)
		cancel()
		took := time.Since(start)
		t.Logf("stopped QEMU: HotplugCPUs failed after %v: %v", took.Round(time.Millisecond), err)
		if !errors.Is(err, context.DeadlineExceeded) || took < 450*time.Millisecond || took > 1500*time.Millisecond {
			t.Errorf("HotplugCPUs on a stopped QEMU: %v after %v, want DeadlineExceeded after ~500ms", err, took)
		}
		// ... and without one, Options.CommandTimeout (2 s) does.
		start = time.Now()
		_, err = c.BlockThrottle(context.Background(), "disk0")
		took = time.Since(start)
		if !errors.Is(err, context.DeadlineExceeded) || took < 1900*time.Millisecond || took > 3*time.Second {
			t.Errorf("BlockThrottle on a stopped QEMU: %v after %v, want DeadlineExceeded after ~2s", err, took)
		}

		// Meanwhile the guest's own monitor is unaffected: each round
		// trip succeeds within a 1 s deadline.
		var worst time.Duration
		for i := 0; i < 5; i++ {
			start := time.Now()
			octx, cancel := context.WithTimeout(ctx, time.Second)
			_, err := other.BalloonActual(octx)
			cancel()
			if err != nil {
				t.Fatalf("other VM's query-balloon while a QEMU is stopped: %v", err)
			}
			worst = max(worst, time.Since(start))
		}
		t.Logf("other VM's query-balloon while a QEMU is stopped: worst of 5 %v", worst.Round(time.Microsecond))

		// A redial to the stopped QEMU is bounded by the context too (the
		// kernel accepts the connection; the greeting never comes).
		first := r.Monitor()
		first.Close()
		start = time.Now()
		cctx, cancel = context.WithTimeout(ctx, 700*time.Millisecond)
		_, err = c.BalloonActual(cctx)
		cancel()
		took = time.Since(start)
		t.Logf("stopped QEMU: redial failed after %v: %v", took.Round(time.Millisecond), err)
		if !errors.Is(err, context.DeadlineExceeded) || took > 1500*time.Millisecond {
			t.Errorf("redial to a stopped QEMU: %v after %v, want DeadlineExceeded after ~700ms", err, took)
		}

		// Resumed, the connection works again (late replies are
		// dropped as stale, not taken for the next command's).
		cont()
		slots, err := c.HotplugCPUs(ctx)
		if err != nil || len(slots) != 2 {
			t.Fatalf("after SIGCONT: %v, %v", slots, err)
		}
		if r.Reconnects() != 1 {
			t.Errorf("%d reconnects, want 1 (timeouts alone must not reconnect)", r.Reconnects())
		}
	}()
	settleGoroutines(t, base)
}

// TestReconnect: after the monitor's connection is closed, the next
// command redials (same peer PID) and events flow again.
func TestReconnect(t *testing.T) {
	q := bareQEMU(t)
	ctx := ctxT(t, 30*time.Second)
	base := runtime.NumGoroutine()
	func() {
		r, err := qmpact.DialReconnecting(ctx, q.Socket, qmp.Options{ExpectPID: q.PID})
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		c, err := qmpact.NewController(ctx, r, qmpact.Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		first := r.Monitor()
		first.Close()
		start := time.Now()
		slots, err := c.HotplugCPUs(ctx)
		if err != nil || len(slots) != 2 {
			t.Fatalf("after close: %v, %v", slots, err)
		}
		t.Logf("redial + query after the connection closed: %v", time.Since(start).Round(time.Microsecond))
		if r.Reconnects() != 1 || r.Monitor() == first || r.Monitor().PeerPID() != q.PID {
			t.Fatalf("reconnects %d, same monitor %v, peer %d", r.Reconnects(), r.Monitor() == first, r.Monitor().PeerPID())
		}
		waitEvent(t, c, qmpact.EventReconnected, 1)

		// Events from the new connection reach the Controller.
		if err := r.Execute(ctx, "cont", nil, nil); err != nil {
			t.Fatal(err)
		}
		waitEvent(t, c, "RESUME", 1)
		if err := r.Execute(ctx, "stop", nil, nil); err != nil {
			t.Fatal(err)
		}
		waitEvent(t, c, "STOP", 1)

		// A real QMP error names its command: QEMU refuses a vCPU unplug
		// before the guest has switched ACPI CPU hotplug to its modern
		// interface (no guest here).
		s, err := c.AddCPU(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var qe *qmp.Error
		if err := c.RemoveCPU(ctx, s.ID); !errors.As(err, &qe) || qe.Command != "device_del" {
			t.Errorf("RemoveCPU without a guest: %v, want a *qmp.Error from device_del", err)
		}
	}()
	settleGoroutines(t, base)
}

func waitEvent(t *testing.T, c *qmpact.Controller, name string, n uint64) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for c.EventCount(name) < n {
		if time.Now().After(deadline) {
			t.Fatalf("%s seen %d times, want %d", name, c.EventCount(name), n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestShutdown: QEMU's SHUTDOWN marks the VM gone; later calls fail with
// ErrVMGone without sending anything, and a redial gives up at once once
// the process has exited.
func TestShutdown(t *testing.T) {
	q := bareQEMU(t)
	ctx := ctxT(t, 30*time.Second)
	r, err := qmpact.DialReconnecting(ctx, q.Socket, qmp.Options{ExpectPID: q.PID})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	c, err := qmpact.NewController(ctx, r, qmpact.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := r.Execute(ctx, "quit", nil, nil); err != nil && !errors.Is(err, qmp.ErrDisconnected) {
		t.Fatalf("quit: %v", err)
	}
	select {
	case <-c.Gone():
	case <-time.After(5 * time.Second):
		t.Fatal("no SHUTDOWN handled after quit")
	}
	if err := c.Balloon(ctx, 64<<20); !errors.Is(err, qmpact.ErrVMGone) {
		t.Errorf("Balloon after SHUTDOWN: %v, want ErrVMGone", err)
	}
	for !q.Exited() {
		time.Sleep(10 * time.Millisecond)
	}
	start := time.Now()
	if err := r.Execute(ctx, "query-status", nil, nil); !errors.Is(err, qmpact.ErrVMGone) {
		t.Errorf("redial to an exited QEMU: %v, want ErrVMGone", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("redial to an exited QEMU took %v", d)
	}
}

// TestRealErrors: QMP error replies from a real QEMU carry the command
// name; invalid values never reach it.
func TestRealErrors(t *testing.T) {
	q := bareQEMU(t)
	ctx := ctxT(t, 20*time.Second)
	m, err := qmp.Dial(ctx, q.Socket, qmp.Options{ExpectPID: q.PID})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	c, err := qmpact.NewController(ctx, m, qmpact.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if l := c.Limits(); l.MaxMem != 64<<20 {
		t.Fatalf("limits %+v, want MaxMem 64 MiB", l)
	}
	// No balloon device in this QEMU.
	var qe *qmp.Error
	err = c.Balloon(ctx, 64<<20)
	if !errors.As(err, &qe) || qe.Command != "balloon" || qe.Class != "DeviceNotActive" {
		t.Errorf("balloon without a device: %v, want *qmp.Error{balloon, DeviceNotActive}", err)
	}
	_, err = c.BalloonActual(ctx)
	if !errors.As(err, &qe) || qe.Command != "query-balloon" {
		t.Errorf("query-balloon without a device: %v", err)
	}
	// A boot vCPU cannot be unplugged: refused before device_del.
	slots, err := c.HotplugCPUs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.RemoveCPU(ctx, "cpu0"); !errors.Is(err, qmpact.ErrNotFound) {
		t.Errorf("RemoveCPU(cpu0): %v", err)
	}
	_ = slots
	if err := c.Balloon(ctx, 128<<20); !errors.Is(err, qmpact.ErrInvalid) {
		t.Errorf("balloon above maxmem: %v", err)
	}
}
