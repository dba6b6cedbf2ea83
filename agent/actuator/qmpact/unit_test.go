package qmpact_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ars-dev/ars/agent/actuator/qmpact"
	"github.com/ars-dev/ars/agent/qmp"
	"github.com/ars-dev/ars/agent/qmp/qmptest"
	goqmp "github.com/digitalocean/go-qemu/qmp"
)

// fakeQEMU is a scripted QMP server with a 256 MiB VM, two vCPU slots
// (one plugged) and drive disk0; it records the commands it receives.
type fakeQEMU struct {
	*qmptest.Fake
	mu       sync.Mutex
	cmds     []string
	conns    int
	plugged  string                                // hot-plugged vCPU id
	onCmd    func(*qmptest.Conn, qmptest.Cmd) bool // true: handled (or dropped)
	throttle json.RawMessage
}

func newFakeQEMU(t *testing.T) *fakeQEMU {
	f := &fakeQEMU{}
	f.Fake = qmptest.Listen(t, filepath.Join(t.TempDir(), "fake.sock"), func(c *qmptest.Conn) {
		f.mu.Lock()
		f.conns++
		f.mu.Unlock()
		if c.Handshake() != nil {
			return
		}
		for {
			cmd, err := c.Recv()
			if err != nil {
				return
			}
			f.mu.Lock()
			f.cmds = append(f.cmds, cmd.Execute)
			hook := f.onCmd
			f.mu.Unlock()
			if hook != nil && hook(c, cmd) {
				continue
			}
			ret, qerr := f.answer(cmd)
			if qerr != "" {
				c.ReplyError(cmd, "GenericError", qerr)
			} else {
				var b bytes.Buffer
				if err := json.Compact(&b, []byte(ret)); err != nil {
					panic(err)
				}
				c.Reply(cmd, b.String())
			}
		}
	})
	return f
}

func (f *fakeQEMU) answer(cmd qmptest.Cmd) (string, string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	switch cmd.Execute {
	case "query-memory-size-summary":
		return `{"base-memory": 268435456, "plugged-memory": 0}`, ""
	case "query-balloon":
		return `{"actual": 268435456}`, ""
	case "balloon", "device_del":
		return `{}`, ""
	case "device_add":
		var a struct{ ID string }
		json.Unmarshal(cmd.Args, &a)
		f.plugged = a.ID
		return `{}`, ""
	case "block_set_io_throttle":
		f.throttle = cmd.Args
		return `{}`, ""
	case "query-hotpluggable-cpus":
		p := ""
		if f.plugged != "" {
			p = fmt.Sprintf(`, "qom-path": "/machine/peripheral/%s"`, f.plugged)
		}
		return `[{"props": {"core-id": 1, "thread-id": 0, "socket-id": 0}, "vcpus-count": 1, "type": "qemu64-x86_64-cpu"` + p + `},
			{"props": {"core-id": 0, "thread-id": 0, "socket-id": 0}, "vcpus-count": 1, "qom-path": "/machine/unattached/device[0]", "type": "qemu64-x86_64-cpu"}]`, ""
	case "query-cpus-fast":
		p := ""
		if f.plugged != "" {
			p = fmt.Sprintf(`, {"cpu-index": 1, "qom-path": "/machine/peripheral/%s", "thread-id": 4343, "target": "x86_64"}`, f.plugged)
		}
		return `[{"cpu-index": 0, "qom-path": "/machine/unattached/device[0]", "thread-id": 4242, "target": "x86_64"}` + p + `]`, ""
	case "query-block":
		return `[{"device": "disk0", "qdev": "/machine/peripheral/vda/virtio-backend", "locked": false, "removable": false, "type": "unknown",
			"inserted": {"file": "/x", "ro": false, "drv": "raw", "encrypted": false, "encryption_key_missing": false, "detect_zeroes": "off",
			"bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 7, "iops_rd": 0, "iops_wr": 0, "backing_file_depth": 0, "write_threshold": 0,
			"cache": {"writeback": true, "direct": true, "no-flush": false},
			"image": {"filename": "/x", "format": "raw", "virtual-size": 67108864}}}]`, ""
	}
	return "", "The command " + cmd.Execute + " has not been found"
}

func (f *fakeQEMU) commands() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.cmds...)
}

func dialFake(t *testing.T, f *fakeQEMU, opts qmpact.Options) (*qmpact.Controller, *qmpact.Reconnecting) {
	t.Helper()
	ctx := ctxT(t, 5*time.Second)
	r, err := qmpact.DialReconnecting(ctx, f.Path, qmp.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	c, err := qmpact.NewController(ctx, r, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, r
}

// invalidCalls are calls every VMControl must refuse before sending
// anything (for a 256 MiB VM with the default 64 MiB minimum).
func invalidCalls(ctx context.Context, v qmpact.VMControl) map[string]error {
	out := map[string]error{}
	out["balloon 0"] = v.Balloon(ctx, 0)
	out["balloon below min"] = v.Balloon(ctx, 63<<20)
	out["balloon above max"] = v.Balloon(ctx, 256<<20+1)
	out["balloon huge"] = v.Balloon(ctx, 1<<63)
	out["throttle negative bps"] = v.SetBlockThrottle(ctx, "disk0", qmpact.Throttle{BPS: -1})
	out["throttle negative iops_wr"] = v.SetBlockThrottle(ctx, "disk0", qmpact.Throttle{IOPSWrite: -5})
	out["throttle too large"] = v.SetBlockThrottle(ctx, "disk0", qmpact.Throttle{IOPS: qmpact.MaxThrottle + 1})
	out["throttle total+rd"] = v.SetBlockThrottle(ctx, "disk0", qmpact.Throttle{BPS: 1, BPSRead: 1})
	out["throttle no drive"] = v.SetBlockThrottle(ctx, "", qmpact.Throttle{})
	_, out["read throttle no drive"] = v.BlockThrottle(ctx, "")
	out["remove empty id"] = v.RemoveCPU(ctx, "")
	out["remove bad id"] = v.RemoveCPU(ctx, "1cpu")
	out["remove id with space"] = v.RemoveCPU(ctx, "cpu 1")
	return out
}

func TestInvalidRejectedBeforeAnyCommand(t *testing.T) {
	f := newFakeQEMU(t)
	c, _ := dialFake(t, f, qmpact.Options{})
	before := len(f.commands())
	for name, err := range invalidCalls(ctxT(t, 5*time.Second), c) {
		if !errors.Is(err, qmpact.ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", name, err)
		}
	}
	if got := f.commands()[before:]; len(got) != 0 {
		t.Errorf("invalid calls sent %v", got)
	}
	if _, err := qmpact.NewController(ctxT(t, 5*time.Second), nilConn{}, qmpact.Options{Limits: qmpact.Limits{MinBalloon: 2 << 30, MaxMem: 1 << 30}}); !errors.Is(err, qmpact.ErrInvalid) {
		t.Errorf("MinBalloon > MaxMem: %v", err)
	}
}

type nilConn struct{}

func (nilConn) Execute(context.Context, string, any, any) error { return errors.New("unused") }
func (nilConn) Events(context.Context) (<-chan goqmp.Event, error) {
	return make(chan goqmp.Event), nil
}

func TestFakeRejectsInvalid(t *testing.T) {
	f := qmpact.NewFake(256<<20, 1, 2, "disk0")
	for name, err := range invalidCalls(context.Background(), f) {
		if !errors.Is(err, qmpact.ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", name, err)
		}
	}
	for _, c := range f.Calls() {
		if !errors.Is(c.Err, qmpact.ErrInvalid) {
			t.Errorf("recorded %+v", c)
		}
	}
}

func TestFake(t *testing.T) {
	ctx := context.Background()
	f := qmpact.NewFake(256<<20, 1, 2, "disk0")
	if err := f.Balloon(ctx, 128<<20); err != nil {
		t.Fatal(err)
	}
	if a, err := f.BalloonActual(ctx); err != nil || a != 128<<20 {
		t.Fatalf("actual %d, %v", a, err)
	}
	s, err := f.AddCPU(ctx)
	if err != nil || !s.Hotplugged() || s.ThreadID == 0 {
		t.Fatalf("AddCPU %+v, %v", s, err)
	}
	if _, err := f.AddCPU(ctx); !errors.Is(err, qmpact.ErrNoFreeSlot) {
		t.Fatalf("AddCPU when full: %v", err)
	}
	if err := f.RemoveCPU(ctx, s.ID); err != nil {
		t.Fatal(err)
	}
	if err := f.RemoveCPU(ctx, s.ID); !errors.Is(err, qmpact.ErrNotFound) {
		t.Fatalf("second RemoveCPU: %v", err)
	}
	if _, err := f.AddCPU(ctx); !errors.Is(err, qmpact.ErrReplugUnsafe) {
		t.Fatalf("AddCPU after RemoveCPU: %v, want ErrReplugUnsafe like Controller", err)
	}
	want := qmpact.Throttle{BPS: 1 << 20}
	if err := f.SetBlockThrottle(ctx, "disk0", want); err != nil {
		t.Fatal(err)
	}
	if got, err := f.BlockThrottle(ctx, "disk0"); err != nil || got != want {
		t.Fatalf("throttle %+v, %v", got, err)
	}
	boom := errors.New("boom")
	f.Fail("Balloon", boom)
	if err := f.Balloon(ctx, 200<<20); !errors.Is(err, boom) {
		t.Fatalf("injected failure: %v", err)
	}
	var methods []string
	for _, c := range f.Calls() {
		methods = append(methods, c.Method)
	}
	if got := strings.Join(methods, ","); got != "Balloon,BalloonActual,AddCPU,AddCPU,RemoveCPU,RemoveCPU,AddCPU,SetBlockThrottle,BlockThrottle,Balloon" {
		t.Errorf("calls %s", got)
	}
}

// TestFakeServerCommands checks the exact commands and arguments sent.
func TestFakeServerCommands(t *testing.T) {
	f := newFakeQEMU(t)
	c, _ := dialFake(t, f, qmpact.Options{})
	ctx := ctxT(t, 5*time.Second)
	var args []string
	f.mu.Lock()
	f.onCmd = func(_ *qmptest.Conn, cmd qmptest.Cmd) bool {
		args = append(args, cmd.Execute+" "+string(cmd.Args))
		return false
	}
	f.mu.Unlock()
	if err := c.Balloon(ctx, 160<<20); err != nil {
		t.Fatal(err)
	}
	if err := c.SetBlockThrottle(ctx, "vda", qmpact.Throttle{BPS: 262144}); err != nil {
		t.Fatal(err)
	}
	th, err := c.BlockThrottle(ctx, "disk0")
	if err != nil || th != (qmpact.Throttle{IOPS: 7}) {
		t.Fatalf("BlockThrottle %+v, %v", th, err)
	}
	s, err := c.AddCPU(ctx)
	if err != nil || s.ID != "ars-cpu-0-1-0" || s.ThreadID != 4343 || s.CPUIndex != 1 {
		t.Fatalf("AddCPU %+v, %v", s, err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	got := strings.Join(args, "\n")
	for _, want := range []string{
		`balloon {"value":167772160}`,
		`block_set_io_throttle {"device":"disk0","bps":262144,"bps_rd":0,"bps_wr":0,"iops":0,"iops_rd":0,"iops_wr":0}`,
		`device_add {"core-id":1,"driver":"qemu64-x86_64-cpu","id":"ars-cpu-0-1-0","socket-id":0,"thread-id":0}`,
	} {
		if !strings.Contains(got, want) {
			t.Errorf("missing %s in\n%s", want, got)
		}
	}
}

// TestErrorNamesCommand: a QMP error reply is a *qmp.Error with the name.
func TestErrorNamesCommand(t *testing.T) {
	f := newFakeQEMU(t)
	c, _ := dialFake(t, f, qmpact.Options{})
	f.mu.Lock()
	f.onCmd = func(conn *qmptest.Conn, cmd qmptest.Cmd) bool {
		if cmd.Execute == "block_set_io_throttle" {
			conn.ReplyError(cmd, "GenericError", "bps_max/iops_max require corresponding bps/iops values")
			return true
		}
		return false
	}
	f.mu.Unlock()
	err := c.SetBlockThrottle(ctxT(t, 5*time.Second), "disk0", qmpact.Throttle{BPS: 1})
	var qe *qmp.Error
	if !errors.As(err, &qe) || qe.Command != "block_set_io_throttle" || qe.Class != "GenericError" {
		t.Fatalf("err = %#v", err)
	}
	if !strings.Contains(err.Error(), "block_set_io_throttle") {
		t.Errorf("message %q lacks the command", err)
	}
}

// TestEvents: BALLOON_CHANGE, DEVICE_DELETED (completing RemoveCPU) and
// SHUTDOWN from the server.
func TestEvents(t *testing.T) {
	f := newFakeQEMU(t)
	f.mu.Lock()
	f.plugged = "ars-cpu-0-1-0"
	f.onCmd = func(conn *qmptest.Conn, cmd qmptest.Cmd) bool {
		if cmd.Execute == "device_del" {
			conn.Reply(cmd, "{}")
			go func() {
				time.Sleep(50 * time.Millisecond)
				f.mu.Lock()
				f.plugged = ""
				f.mu.Unlock()
				conn.Event("DEVICE_DELETED", `{"path": "/machine/peripheral/ars-cpu-0-1-0/lapic"}`)
				conn.Event("BALLOON_CHANGE", `{"actual": 134217728}`)
			}()
			return true
		}
		return false
	}
	f.mu.Unlock()
	c, _ := dialFake(t, f, qmpact.Options{UnplugPoll: time.Hour})
	ctx := ctxT(t, 5*time.Second)
	if err := c.RemoveCPU(ctx, "ars-cpu-0-1-0"); err != nil {
		t.Fatal(err)
	}
	waitEvent(t, c, "BALLOON_CHANGE", 1)
	if a, _, ok := c.LastBalloonChange(); !ok || a != 128<<20 {
		t.Errorf("last balloon change %d %v", a, ok)
	}
	// After an unplug, AddCPU is refused without sending device_add ...
	n := len(f.commands())
	if _, err := c.AddCPU(ctx); !errors.Is(err, qmpact.ErrReplugUnsafe) {
		t.Errorf("AddCPU after unplug: %v, want ErrReplugUnsafe", err)
	}
	if got := f.commands()[n:]; len(got) != 0 {
		t.Errorf("refused AddCPU sent %v", got)
	}
	// ... unless allowed.
	c2, _ := dialFake(t, f, qmpact.Options{AllowReplug: true})
	if s, err := c2.AddCPU(ctx); err != nil || s.ID != "ars-cpu-0-1-0" {
		t.Errorf("AddCPU with AllowReplug: %+v, %v", s, err)
	}
}

func TestEventsShutdown(t *testing.T) {
	f := newFakeQEMU(t)
	var srv *qmptest.Conn
	ready := make(chan struct{})
	f.mu.Lock()
	f.onCmd = func(conn *qmptest.Conn, cmd qmptest.Cmd) bool {
		if srv == nil {
			srv = conn
			close(ready)
		}
		return false
	}
	f.mu.Unlock()
	c, _ := dialFake(t, f, qmpact.Options{})
	<-ready
	n := len(f.commands())
	srv.Event("SHUTDOWN", `{"guest": true, "reason": "guest-shutdown"}`)
	select {
	case <-c.Gone():
	case <-time.After(3 * time.Second):
		t.Fatal("SHUTDOWN not handled")
	}
	if err := c.Balloon(context.Background(), 128<<20); !errors.Is(err, qmpact.ErrVMGone) || !strings.Contains(err.Error(), "guest-shutdown") {
		t.Errorf("after SHUTDOWN: %v", err)
	}
	if got := f.commands()[n:]; len(got) != 0 {
		t.Errorf("sent %v after SHUTDOWN", got)
	}
}

// TestRetryIdempotent: when the connection drops under a command, an
// idempotent one is re-sent on a new connection, device_del is not.
func TestRetryIdempotent(t *testing.T) {
	f := newFakeQEMU(t)
	c, r := dialFake(t, f, qmpact.Options{})
	ctx := ctxT(t, 10*time.Second)
	var dropMu sync.Mutex
	drop := map[string]int{"query-balloon": 1, "device_del": 1}
	f.mu.Lock()
	f.onCmd = func(conn *qmptest.Conn, cmd qmptest.Cmd) bool {
		dropMu.Lock()
		defer dropMu.Unlock()
		if drop[cmd.Execute] > 0 {
			drop[cmd.Execute]--
			conn.Close()
			return true
		}
		return false
	}
	f.plugged = "ars-cpu-0-1-0"
	f.mu.Unlock()
	if a, err := c.BalloonActual(ctx); err != nil || a != 256<<20 {
		t.Fatalf("query-balloon across a dropped connection: %d, %v", a, err)
	}
	if r.Reconnects() != 1 {
		t.Errorf("reconnects %d, want 1", r.Reconnects())
	}
	err := c.RemoveCPU(ctx, "ars-cpu-0-1-0")
	if !errors.Is(err, qmp.ErrDisconnected) {
		t.Errorf("device_del across a dropped connection: %v, want ErrDisconnected (not re-sent)", err)
	}
	dels := 0
	for _, cmd := range f.commands() {
		if cmd == "device_del" {
			dels++
		}
	}
	if dels != 1 {
		t.Errorf("device_del sent %d times", dels)
	}
}

// TestRedialRefusesSymlink: a redial goes through qmp.Dial's checks, so a
// socket path replaced by a symbolic link is refused at once, not retried.
func TestRedialRefusesSymlink(t *testing.T) {
	f := newFakeQEMU(t)
	ctx := ctxT(t, 5*time.Second)
	r, err := qmpact.DialReconnecting(ctx, f.Path, qmp.Options{ExpectPID: os.Getpid()})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	moved := f.Path + ".real"
	if err := os.Rename(f.Path, moved); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(moved, f.Path); err != nil {
		t.Fatal(err)
	}
	r.Monitor().Close()
	start := time.Now()
	err = r.Execute(ctx, "query-balloon", nil, nil)
	if !errors.Is(err, qmp.ErrSymlink) || time.Since(start) > time.Second {
		t.Fatalf("redial through a symlink: %v after %v, want ErrSymlink at once", err, time.Since(start))
	}
	// Back in place, the next command redials.
	os.Remove(f.Path)
	if err := os.Rename(moved, f.Path); err != nil {
		t.Fatal(err)
	}
	if err := r.Execute(ctx, "query-balloon", nil, nil); err != nil || r.Reconnects() != 1 {
		t.Fatalf("redial after restoring the socket: %v, reconnects %d", err, r.Reconnects())
	}
}
