package qmp_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ars-dev/ars/agent/qmp"
	"github.com/ars-dev/ars/agent/qmp/qmptest"
	goqmp "github.com/digitalocean/go-qemu/qmp"
	"github.com/digitalocean/go-qemu/qmp/raw"
)

const statusRunning = `{"status": "running", "singlestep": false, "running": true}`

func sockPath(t *testing.T) string { return filepath.Join(t.TempDir(), "vm.sock") }

// dial connects to a fake and closes the monitor at cleanup.
func dial(t *testing.T, path string, opts qmp.Options) *qmp.Monitor {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	m, err := qmp.Dial(ctx, path, opts)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func TestHandshakeCommandAndPeer(t *testing.T) {
	var sawID atomic.Value
	f := qmptest.Listen(t, sockPath(t), func(c *qmptest.Conn) {
		if err := c.Handshake(); err != nil {
			t.Error(err)
			return
		}
		c.Serve(func(cmd qmptest.Cmd) (string, error) {
			sawID.Store(string(cmd.ID))
			if cmd.Execute == "query-status" {
				return statusRunning, nil
			}
			return "", fmt.Errorf("unexpected %s", cmd.Execute)
		})
	})
	m := dial(t, f.Path, qmp.Options{ExpectPID: os.Getpid()})
	if m.PeerPID() != os.Getpid() || m.PeerUID() != os.Getuid() {
		t.Errorf("peer = pid %d uid %d, want pid %d uid %d", m.PeerPID(), m.PeerUID(), os.Getpid(), os.Getuid())
	}
	if v := m.Greeting().Version.String(); v != "7.2.0" {
		t.Errorf("greeting version %q, want 7.2.0", v)
	}
	var st raw.StatusInfo
	if err := m.Execute(ctxT(t, 2*time.Second), "query-status", nil, &st); err != nil {
		t.Fatal(err)
	}
	if !st.Running || st.Status != raw.RunStateRunning {
		t.Errorf("status %+v", st)
	}
	if id, _ := sawID.Load().(string); !strings.HasPrefix(id, `"ars-`) {
		t.Errorf("command id %s, want a string ars-N", id)
	}
	// The same through go-qemu's generated API.
	st2, err := raw.NewMonitor(m).QueryStatus()
	if err != nil || st2 != st {
		t.Errorf("raw QueryStatus = %+v, %v; want %+v", st2, err, st)
	}
	// Run returns the whole reply, as go-qemu expects.
	out, err := m.Run([]byte(`{"execute":"query-status","id":"caller-id"}`))
	if err != nil {
		t.Fatal(err)
	}
	var whole map[string]json.RawMessage
	if err := json.Unmarshal(out, &whole); err != nil || whole["return"] == nil {
		t.Errorf("Run reply %s (%v) has no return member", out, err)
	}
	if m.Connect() != nil {
		t.Error("Connect on a live monitor should be nil")
	}
}

func TestBadCommandsRejectedLocally(t *testing.T) {
	f := qmptest.Listen(t, sockPath(t), func(c *qmptest.Conn) {
		c.Handshake()
		c.Serve(func(qmptest.Cmd) (string, error) { return "{}", nil })
	})
	m := dial(t, f.Path, qmp.Options{})
	for _, cmd := range []string{``, `[]`, `{"arguments":{}}`, `{"execute":""}`, `{"execute":1}`, `not json`} {
		if _, err := m.Run([]byte(cmd)); err == nil {
			t.Errorf("Run(%q) succeeded", cmd)
		}
	}
}

func TestErrorReply(t *testing.T) {
	f := qmptest.Listen(t, sockPath(t), func(c *qmptest.Conn) {
		c.Handshake()
		for {
			cmd, err := c.Recv()
			if err != nil {
				return
			}
			c.ReplyError(cmd, "CommandNotFound", "The command "+cmd.Execute+" has not been found")
		}
	})
	m := dial(t, f.Path, qmp.Options{})
	err := m.Execute(ctxT(t, 2*time.Second), "no-such-cmd", map[string]int{"x": 1}, nil)
	var qe *qmp.Error
	if !errors.As(err, &qe) {
		t.Fatalf("err = %v (%T), want *qmp.Error", err, err)
	}
	if qe.Command != "no-such-cmd" || qe.Class != "CommandNotFound" || !strings.Contains(qe.Desc, "no-such-cmd") {
		t.Errorf("error = %+v", qe)
	}
	if !qmp.IsClass(err, "CommandNotFound") || qmp.IsClass(err, "GenericError") {
		t.Error("IsClass wrong")
	}
	if m.Err() != nil {
		t.Errorf("an error reply must not end the connection: %v", m.Err())
	}
}

func TestInterleavedEvents(t *testing.T) {
	f := qmptest.Listen(t, sockPath(t), func(c *qmptest.Conn) {
		c.Handshake()
		for {
			cmd, err := c.Recv()
			if err != nil {
				return
			}
			c.Event("STOP", "")
			c.Event("BALLOON_CHANGE", `{"actual": 134217728}`)
			c.Reply(cmd, `{"n": 42}`)
			c.Event("RESUME", "")
		}
	})
	m := dial(t, f.Path, qmp.Options{})
	evctx, stop := context.WithCancel(context.Background())
	evs, err := m.Events(evctx)
	if err != nil {
		t.Fatal(err)
	}
	evs2, _ := m.Events(context.Background()) // second subscriber sees the same
	var out struct{ N int }
	if err := m.Execute(ctxT(t, 2*time.Second), "x", nil, &out); err != nil || out.N != 42 {
		t.Fatalf("Execute = %+v, %v", out, err)
	}
	want := []string{"STOP", "BALLOON_CHANGE", "RESUME"}
	for _, ch := range []<-chan goqmp.Event{evs, evs2} {
		for i, w := range want {
			select {
			case ev := <-ch:
				if ev.Event != w {
					t.Errorf("event %d = %s, want %s", i, ev.Event, w)
				}
				if w == "BALLOON_CHANGE" && ev.Data["actual"] != float64(134217728) {
					t.Errorf("balloon data %v", ev.Data)
				}
				if ev.Timestamp.Seconds == 0 {
					t.Errorf("event %s without timestamp", w)
				}
			case <-time.After(2 * time.Second):
				t.Fatalf("event %s not received", w)
			}
		}
	}
	stop()
	select {
	case _, ok := <-evs:
		if ok {
			t.Error("unexpected extra event")
		}
	case <-time.After(2 * time.Second):
		t.Error("events channel not closed after its context ended")
	}
	if s := m.Stats(); s.Events != 3 || s.EventsDropped != 0 {
		t.Errorf("stats %+v", s)
	}
}

func TestSlowSubscriberDoesNotBlockReader(t *testing.T) {
	f := qmptest.Listen(t, sockPath(t), func(c *qmptest.Conn) {
		c.Handshake()
		cmd, err := c.Recv()
		if err != nil {
			return
		}
		for i := 0; i < 10; i++ {
			c.Event("RTC_CHANGE", fmt.Sprintf(`{"offset": %d}`, i))
		}
		c.Reply(cmd, "{}")
		c.Serve(func(qmptest.Cmd) (string, error) { return "{}", nil })
	})
	m := dial(t, f.Path, qmp.Options{EventBuffer: 2})
	evs, _ := m.Events(context.Background()) // never drained during the command
	if err := m.Execute(ctxT(t, 2*time.Second), "x", nil, nil); err != nil {
		t.Fatalf("reader blocked by a full subscriber? %v", err)
	}
	if s := m.Stats(); s.Events != 10 || s.EventsDropped != 8 {
		t.Errorf("stats %+v, want 10 events 8 dropped", s)
	}
	for i := 0; i < 2; i++ {
		ev := <-evs
		if ev.Data["offset"] != float64(i) {
			t.Errorf("kept event %d has data %v", i, ev.Data)
		}
	}
}

func TestMalformedReplies(t *testing.T) {
	bad := []string{
		`this is not json`,
		`{"return": {}, "error": {"class": "GenericError", "desc": "x"}, "id": %s}`,
		`{"error": {"class": "GenericError"}, "id": %s}`,
		`["return"]`,
		`{"return": {"truncated": `,
		`{"id": %s}`,
		`{"QMP": {"version": {}}}`,
	}
	i := 0
	f := qmptest.Listen(t, sockPath(t), func(c *qmptest.Conn) {
		c.Handshake()
		for {
			cmd, err := c.Recv()
			if err != nil {
				return
			}
			if cmd.Execute == "good" {
				c.Reply(cmd, `{"ok": true}`)
				continue
			}
			msg := bad[i%len(bad)]
			if strings.Contains(msg, "%s") {
				msg = fmt.Sprintf(msg, cmd.ID)
			}
			i++
			c.Send(msg)
		}
	})
	m := dial(t, f.Path, qmp.Options{})
	for n := range bad {
		err := m.Execute(ctxT(t, 2*time.Second), "query-bad", nil, nil)
		if !errors.Is(err, qmp.ErrMalformed) || !strings.Contains(err.Error(), "query-bad") {
			t.Errorf("case %d (%s): err = %v, want ErrMalformed naming query-bad", n, bad[n], err)
		}
		// The stream is still in sync: the next command works.
		var ok struct{ OK bool }
		if err := m.Execute(ctxT(t, 2*time.Second), "good", nil, &ok); err != nil || !ok.OK {
			t.Fatalf("case %d: command after a malformed reply: %+v %v", n, ok, err)
		}
	}
	if s := m.Stats(); s.BadMessages != uint64(len(bad)) {
		t.Errorf("BadMessages = %d, want %d", s.BadMessages, len(bad))
	}
	// A well-formed reply whose value does not fit out names the command.
	var wrong []int
	if err := m.Execute(ctxT(t, 2*time.Second), "good", nil, &wrong); err == nil || !strings.Contains(err.Error(), "good") {
		t.Errorf("decode into wrong type: %v", err)
	}
}

func TestOversizedReply(t *testing.T) {
	const limit = 4096
	f := qmptest.Listen(t, sockPath(t), func(c *qmptest.Conn) {
		c.Handshake()
		for {
			cmd, err := c.Recv()
			if err != nil {
				return
			}
			if cmd.Execute == "big" {
				c.Reply(cmd, `"`+strings.Repeat("x", 200_000)+`"`)
				continue
			}
			c.Reply(cmd, `"`+strings.Repeat("y", limit-100)+`"`)
		}
	})
	m := dial(t, f.Path, qmp.Options{MaxMessage: limit})
	err := m.Execute(ctxT(t, 2*time.Second), "big", nil, nil)
	if !errors.Is(err, qmp.ErrTooLarge) || !strings.Contains(err.Error(), "big") {
		t.Fatalf("err = %v, want ErrTooLarge naming big", err)
	}
	var s string
	if err := m.Execute(ctxT(t, 2*time.Second), "near-limit", nil, &s); err != nil || len(s) != limit-100 {
		t.Fatalf("reply just under the limit: len %d, %v", len(s), err)
	}
}

func TestServerClosesMidCommand(t *testing.T) {
	f := qmptest.Listen(t, sockPath(t), func(c *qmptest.Conn) {
		c.Handshake()
		c.Recv() // take the command, then die without answering
	})
	m := dial(t, f.Path, qmp.Options{Timeout: 30 * time.Second})
	evs, _ := m.Events(context.Background())
	start := time.Now()
	err := m.Execute(context.Background(), "query-status", nil, nil)
	if !errors.Is(err, qmp.ErrDisconnected) || !strings.Contains(err.Error(), "query-status") {
		t.Fatalf("err = %v, want ErrDisconnected naming the command", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("pending call failed after %v, want promptly", d)
	}
	select {
	case <-m.Done():
	case <-time.After(time.Second):
		t.Fatal("Done not closed")
	}
	if _, ok := <-evs; ok {
		t.Error("events channel should be closed")
	}
	start = time.Now()
	if err := m.Execute(context.Background(), "query-status", nil, nil); !errors.Is(err, qmp.ErrDisconnected) || time.Since(start) > 500*time.Millisecond {
		t.Errorf("call after disconnect: %v after %v", err, time.Since(start))
	}
	if !errors.Is(m.Connect(), qmp.ErrDisconnected) {
		t.Errorf("Connect after disconnect = %v", m.Connect())
	}
	if _, err := m.Events(context.Background()); err == nil {
		t.Error("Events after disconnect should fail")
	}
}

func TestCloseFailsPendingCall(t *testing.T) {
	got := make(chan struct{})
	f := qmptest.Listen(t, sockPath(t), func(c *qmptest.Conn) {
		c.Handshake()
		c.Recv()
		close(got)
		c.Recv() // hold the connection until the client closes
	})
	m := dial(t, f.Path, qmp.Options{})
	errc := make(chan error, 1)
	go func() { errc <- m.Execute(context.Background(), "slow", nil, nil) }()
	<-got
	m.Close()
	select {
	case err := <-errc:
		if !errors.Is(err, qmp.ErrClosed) {
			t.Errorf("err = %v, want ErrClosed", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("pending call not failed by Close")
	}
}

func TestTimeoutAndLateReply(t *testing.T) {
	f := qmptest.Listen(t, sockPath(t), func(c *qmptest.Conn) {
		c.Handshake()
		first, err := c.Recv()
		if err != nil {
			return
		}
		second, err := c.Recv() // sent after the first timed out
		if err != nil {
			return
		}
		c.Reply(first, `"late"`)
		c.Reply(second, `"second"`)
		c.Serve(func(qmptest.Cmd) (string, error) {
			time.Sleep(time.Second)
			return `"slow"`, nil
		})
	})
	m := dial(t, f.Path, qmp.Options{Timeout: 200 * time.Millisecond})
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := m.Execute(ctx, "first", nil, nil)
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "first") {
		t.Fatalf("err = %v, want deadline exceeded naming first", err)
	}
	if d := time.Since(start); d < 90*time.Millisecond || d > time.Second {
		t.Errorf("timed out after %v, want ≈100ms", d)
	}
	var s string
	if err := m.Execute(ctxT(t, 2*time.Second), "second", nil, &s); err != nil || s != "second" {
		t.Fatalf("second = %q, %v (the late reply to first must not be taken for it)", s, err)
	}
	if st := m.Stats(); st.StaleReplies != 1 {
		t.Errorf("StaleReplies = %d, want 1", st.StaleReplies)
	}
	// No deadline in ctx: Options.Timeout (200ms) applies, also through Run.
	start = time.Now()
	_, err = m.Run([]byte(`{"execute":"third"}`))
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Run err = %v, want deadline exceeded", err)
	}
	if d := time.Since(start); d < 190*time.Millisecond || d > time.Second {
		t.Errorf("default timeout took %v, want ≈200ms", d)
	}
}

func TestCommandsSerialized(t *testing.T) {
	var overlap atomic.Int32
	f := qmptest.Listen(t, sockPath(t), func(c *qmptest.Conn) {
		c.Handshake()
		for {
			cmd, err := c.Recv()
			if err != nil {
				return
			}
			// Nothing else may arrive before we answer.
			c.SetReadDeadline(time.Now().Add(5 * time.Millisecond))
			if _, err := c.Recv(); err == nil {
				overlap.Add(1)
			}
			c.SetReadDeadline(time.Time{})
			c.Reply(cmd, string(cmd.ID))
		}
	})
	m := dial(t, f.Path, qmp.Options{})
	const n = 20
	errc := make(chan error, n)
	for i := 0; i < n; i++ {
		go func() {
			var echoed string
			err := m.Execute(ctxT(t, 10*time.Second), "echo-id", nil, &echoed)
			if err == nil && !strings.HasPrefix(echoed, "ars-") {
				err = fmt.Errorf("reply %q", echoed)
			}
			errc <- err
		}()
	}
	for i := 0; i < n; i++ {
		if err := <-errc; err != nil {
			t.Error(err)
		}
	}
	if overlap.Load() != 0 {
		t.Errorf("%d commands were sent while another was in flight", overlap.Load())
	}
}

func TestDialRefusals(t *testing.T) {
	dir := t.TempDir()
	f := qmptest.Listen(t, filepath.Join(dir, "real.sock"), func(c *qmptest.Conn) {
		c.Handshake()
		c.Serve(func(qmptest.Cmd) (string, error) { return "{}", nil })
	})
	ctx := ctxT(t, 5*time.Second)

	link := filepath.Join(dir, "link.sock")
	if err := os.Symlink(f.Path, link); err != nil {
		t.Fatal(err)
	}
	if _, err := qmp.Dial(ctx, link, qmp.Options{}); !errors.Is(err, qmp.ErrSymlink) {
		t.Errorf("symlink: err = %v, want ErrSymlink", err)
	}
	regular := filepath.Join(dir, "file.sock")
	os.WriteFile(regular, nil, 0o600)
	if _, err := qmp.Dial(ctx, regular, qmp.Options{}); !errors.Is(err, qmp.ErrNotSocket) {
		t.Errorf("regular file: err = %v, want ErrNotSocket", err)
	}
	if _, err := qmp.Dial(ctx, filepath.Join(dir, "missing.sock"), qmp.Options{}); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing: err = %v, want not exist", err)
	}
	if _, err := qmp.Dial(ctx, f.Path, qmp.Options{ExpectPID: os.Getpid() + 1_000_000}); !errors.Is(err, qmp.ErrPeerMismatch) {
		t.Errorf("wrong pid: err = %v, want ErrPeerMismatch", err)
	}
	// A stale socket: the file of a listener that is gone.
	stale := filepath.Join(dir, "stale.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: stale, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close()
	_, err = qmp.Dial(ctx, stale, qmp.Options{})
	if err == nil || !strings.Contains(err.Error(), "connection refused") || !strings.Contains(err.Error(), stale) {
		t.Errorf("stale socket: err = %v, want connection refused naming the path", err)
	}
}

func TestDialLongPath(t *testing.T) {
	// sun_path holds 108 bytes; Dial connects through /proc/self/fd and
	// must not care. A hard link gives the socket a long name.
	dir := t.TempDir()
	f := qmptest.Listen(t, filepath.Join(dir, "s.sock"), func(c *qmptest.Conn) {
		c.Handshake()
		c.Serve(func(qmptest.Cmd) (string, error) { return "{}", nil })
	})
	long := filepath.Join(dir, strings.Repeat("d", 100), strings.Repeat("e", 100))
	if err := os.MkdirAll(long, 0o755); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(long, "vm.sock")
	if err := os.Link(f.Path, p); err != nil {
		t.Skipf("cannot hard-link a socket here: %v", err)
	}
	m := dial(t, p, qmp.Options{})
	if err := m.Execute(ctxT(t, 2*time.Second), "x", nil, nil); err != nil {
		t.Fatal(err)
	}
}

func TestDialNoGreeting(t *testing.T) {
	f := qmptest.Listen(t, sockPath(t), func(c *qmptest.Conn) {
		c.Recv() // says nothing, like a QEMU already serving another client
	})
	start := time.Now()
	_, err := qmp.Dial(context.Background(), f.Path, qmp.Options{Timeout: 200 * time.Millisecond})
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "another client") {
		t.Errorf("err = %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("took %v", d)
	}
	// Garbage instead of a greeting.
	g := qmptest.Listen(t, filepath.Join(t.TempDir(), "g.sock"), func(c *qmptest.Conn) {
		c.Send(`{"return": {}}`)
		c.Recv()
	})
	if _, err := qmp.Dial(ctxT(t, 2*time.Second), g.Path, qmp.Options{}); !errors.Is(err, qmp.ErrMalformed) {
		t.Errorf("bad greeting: err = %v, want ErrMalformed", err)
	}
	// Refused capabilities negotiation.
	h := qmptest.Listen(t, filepath.Join(t.TempDir(), "h.sock"), func(c *qmptest.Conn) {
		c.Send(qmptest.Greeting)
		cmd, _ := c.Recv()
		c.ReplyError(cmd, "CommandNotFound", "nope")
		c.Recv()
	})
	if _, err := qmp.Dial(ctxT(t, 2*time.Second), h.Path, qmp.Options{}); !qmp.IsClass(err, "CommandNotFound") {
		t.Errorf("refused handshake: err = %v", err)
	}
}
