// Package qmptest owns test helpers for code that talks QMP: a scripted fake
// QMP server on a Unix socket, and a bare QEMU child process (no guest, -S)
// whose QMP socket is real. Both clean up in t.Cleanup.
package qmptest

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ars-dev/ars/internal/testutil"
)

// Greeting is the banner of QEMU 7.2, as the fake server sends it.
const Greeting = `{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7"}, "capabilities": ["oob"]}}`

// Fake is a scripted QMP server listening on a Unix socket.
type Fake struct {
	Path string
	ln   *net.UnixListener
	wg   sync.WaitGroup
	mu   sync.Mutex
	conn []net.Conn
}

// Listen starts a fake server at path; serve runs for each accepted
// connection in its own goroutine. The listener, connections and goroutines
// are closed and awaited in t.Cleanup.
func Listen(t testing.TB, path string, serve func(*Conn)) *Fake {
	t.Helper()
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatalf("qmptest: listen %s: %v", path, err)
	}
	ln.SetUnlinkOnClose(false)
	f := &Fake{Path: path, ln: ln}
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			f.mu.Lock()
			f.conn = append(f.conn, c)
			f.mu.Unlock()
			f.wg.Add(1)
			go func() {
				defer f.wg.Done()
				defer c.Close()
				serve(&Conn{Conn: c, r: bufio.NewReader(c)})
			}()
		}
	}()
	t.Cleanup(f.Close)
	return f
}

// Close stops the server (the socket file stays, like a dead QEMU's).
func (f *Fake) Close() {
	f.ln.Close()
	f.mu.Lock()
	for _, c := range f.conn {
		c.Close()
	}
	f.mu.Unlock()
	f.wg.Wait()
}

// Conn is one client connection of a Fake.
type Conn struct {
	net.Conn
	r *bufio.Reader
}

// Cmd is one command the client sent.
type Cmd struct {
	Execute string
	ID      json.RawMessage
	Args    json.RawMessage
	Raw     []byte
}

// Send writes one message line (CRLF-terminated, as QEMU does).
func (c *Conn) Send(msg string) error {
	_, err := c.Write([]byte(msg + "\r\n"))
	return err
}

// Recv reads one command.
func (c *Conn) Recv() (Cmd, error) {
	line, err := c.r.ReadBytes('\n')
	if err != nil {
		return Cmd{}, err
	}
	var v struct {
		Execute string          `json:"execute"`
		ID      json.RawMessage `json:"id"`
		Args    json.RawMessage `json:"arguments"`
	}
	if err := json.Unmarshal(line, &v); err != nil {
		return Cmd{}, fmt.Errorf("qmptest: bad command %q: %w", line, err)
	}
	return Cmd{Execute: v.Execute, ID: v.ID, Args: v.Args, Raw: line}, nil
}

// Reply sends {"return": ret, "id": cmd.ID}; ret is raw JSON.
func (c *Conn) Reply(cmd Cmd, ret string) error {
	return c.Send(fmt.Sprintf(`{"return": %s, "id": %s}`, ret, idOrNull(cmd.ID)))
}

// ReplyError sends a QMP error reply to cmd.
func (c *Conn) ReplyError(cmd Cmd, class, desc string) error {
	d, _ := json.Marshal(desc)
	return c.Send(fmt.Sprintf(`{"error": {"class": %q, "desc": %s}, "id": %s}`, class, d, idOrNull(cmd.ID)))
}

// Event sends an event with data (raw JSON object, "" for none).
func (c *Conn) Event(name, data string) error {
	now := time.Now()
	msg := fmt.Sprintf(`{"timestamp": {"seconds": %d, "microseconds": %d}, "event": %q`, now.Unix(), now.Nanosecond()/1000, name)
	if data != "" {
		msg += `, "data": ` + data
	}
	return c.Send(msg + "}")
}

// Handshake sends the greeting and answers qmp_capabilities.
func (c *Conn) Handshake() error {
	if err := c.Send(Greeting); err != nil {
		return err
	}
	cmd, err := c.Recv()
	if err != nil {
		return err
	}
	if cmd.Execute != "qmp_capabilities" {
		return fmt.Errorf("qmptest: expected qmp_capabilities, got %q", cmd.Execute)
	}
	return c.Reply(cmd, "{}")
}

// Serve answers commands with handler's raw JSON return value (or error
// when handler returns a non-nil error, sent as GenericError) until the
// client goes away.
func (c *Conn) Serve(handler func(Cmd) (string, error)) {
	for {
		cmd, err := c.Recv()
		if err != nil {
			return
		}
		ret, herr := handler(cmd)
		if herr != nil {
			err = c.ReplyError(cmd, "GenericError", herr.Error())
		} else {
			err = c.Reply(cmd, ret)
		}
		if err != nil {
			return
		}
	}
}

func idOrNull(id json.RawMessage) string {
	if len(id) == 0 {
		return "null"
	}
	return string(id)
}

// QEMU is a bare QEMU child process: q35 under TCG, no devices, no guest,
// stopped (-S), with its QMP socket at Socket.
type QEMU struct {
	Cmd    *exec.Cmd
	PID    int
	Socket string
	Log    string // stderr/stdout file
	once   sync.Once
	exited chan struct{}
}

// Exited reports whether the process has exited (and been reaped).
func (q *QEMU) Exited() bool {
	select {
	case <-q.exited:
		return true
	default:
		return false
	}
}

// StartQEMU starts qemu-system-x86_64 with its QMP server at socket and
// waits until the socket exists. smp is like "1,maxcpus=2". It skips (or
// fails under ARS_REQUIRE_PRIVILEGED=1) when QEMU is not installed. The
// process is killed by PID and reaped in t.Cleanup.
func StartQEMU(t testing.TB, socket, smp string, extra ...string) *QEMU {
	t.Helper()
	bin := testutil.RequireCommand(t, "qemu-system-x86_64")
	if smp == "" {
		smp = "1,maxcpus=2"
	}
	args := append([]string{
		"-machine", "q35,accel=tcg", "-cpu", "qemu64", "-smp", smp, "-m", "64",
		"-nodefaults", "-display", "none", "-S",
		"-qmp", "unix:" + socket + ",server=on,wait=off",
	}, extra...)
	logPath := filepath.Join(t.TempDir(), "qemu.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		t.Fatalf("qmptest: start qemu: %v", err)
	}
	q := &QEMU{Cmd: cmd, PID: cmd.Process.Pid, Socket: socket, Log: logPath, exited: make(chan struct{})}
	go func() {
		cmd.Wait()
		close(q.exited)
	}()
	t.Cleanup(func() {
		q.Kill()
		logf.Close()
	})
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if Listening(socket) {
			break
		}
		if q.Exited() {
			break // the check below reports it with the log
		}
	}
	if !Listening(socket) {
		b, _ := os.ReadFile(logPath)
		t.Fatalf("qmptest: qemu pid %d is not listening on %s; log:\n%s", q.PID, socket, b)
	}
	return q
}

// Kill kills the QEMU by PID and reaps it; it is idempotent.
func (q *QEMU) Kill() {
	q.once.Do(func() {
		q.Cmd.Process.Kill()
		<-q.exited
	})
}

// Threads lists the thread ids of the QEMU process.
func (q *QEMU) Threads() ([]string, error) {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", q.PID))
	if err != nil {
		return nil, err
	}
	var ids []string
	for _, e := range ents {
		ids = append(ids, e.Name())
	}
	return ids, nil
}

// LogText returns QEMU's output so far, for failure messages.
func (q *QEMU) LogText() string {
	b, err := os.ReadFile(q.Log)
	if err != nil {
		return err.Error()
	}
	return strings.TrimSpace(string(b))
}

// Listening reports whether a Unix socket bound at path is listening, from
// /proc/net/unix (the file appears at bind, before listen; connecting in
// between is refused, and connecting to test would take QEMU's only client
// slot for a moment).
func Listening(path string) bool {
	b, err := os.ReadFile("/proc/net/unix")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		// Num RefCount Protocol Flags Type St Inode Path
		f := strings.Fields(line)
		if len(f) < 8 || f[7] != path {
			continue
		}
		flags, err := strconv.ParseUint(f[3], 16, 32)
		if err == nil && flags&0x10000 != 0 { // __SO_ACCEPTCON
			return true
		}
	}
	return false
}
