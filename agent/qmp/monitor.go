// Package qmp owns ARS's connections to QEMU monitors: a QMP client over a
// Unix socket that implements go-qemu's qmp.Monitor interface, so go-qemu's
// generated raw.Monitor API can be used on top of it, and adds what the agent
// needs and go-qemu's SocketMonitor lacks:
//
//   - the socket is opened without following a symbolic link and the peer
//     is identified by SO_PEERCRED (PeerPID, PeerUID), optionally checked
//     against an expected QEMU PID;
//   - every command has a deadline (the context's, or Options.Timeout);
//   - commands are serialized (one in flight) and matched to replies by id,
//     so a late reply to a timed-out command is recognised and dropped;
//   - events are fanned out to subscribers through buffered channels; a slow
//     subscriber loses events (counted in Stats) and never blocks the reader;
//   - QMP error replies are *Error values with class and description;
//     messages are size-bounded (Options.MaxMessage) and validated, and a bad
//     one fails the command in flight with an error naming it, never a panic;
//   - when the connection dies every pending and later call fails at once
//     with an error wrapping ErrDisconnected.
//
// A Monitor is one connection; it is not reconnected. QEMU serves a single
// client per QMP socket, so whoever holds a Monitor holds the VM's monitor
// until Close.
package qmp

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	goqmp "github.com/digitalocean/go-qemu/qmp"
	"github.com/digitalocean/go-qemu/qmp/raw"
)

var _ goqmp.Monitor = (*Monitor)(nil)

// Defaults for Options fields left zero.
const (
	DefaultTimeout     = 10 * time.Second
	DefaultMaxMessage  = 1 << 20
	DefaultEventBuffer = 128
)

// ErrClosed is returned by calls on a Monitor after Close.
var ErrClosed = errors.New("qmp: monitor closed")

// ErrDisconnected is wrapped by the errors of calls that fail because the
// connection ended (QEMU exited, the socket broke, a write failed).
var ErrDisconnected = errors.New("qmp: connection lost")

// ErrTooLarge is wrapped by the error of a command whose reply exceeded
// Options.MaxMessage.
var ErrTooLarge = errors.New("qmp: message exceeds size limit")

// ErrMalformed is wrapped by the error of a command whose reply was not a
// valid QMP message.
var ErrMalformed = errMalformed

// Options tune a Monitor. The zero value is usable.
type Options struct {
	// Timeout bounds the connect + handshake and every command whose
	// context has no deadline. Default DefaultTimeout.
	Timeout time.Duration
	// MaxMessage is the largest server message accepted, in bytes, line
	// terminator included. Default DefaultMaxMessage (1 MiB).
	MaxMessage int
	// EventBuffer is the capacity of each Events channel. Default
	// DefaultEventBuffer.
	EventBuffer int
	// ExpectPID, when > 0, makes Dial fail with ErrPeerMismatch unless the
	// socket's listener is that process.
	ExpectPID int
}

func (o Options) withDefaults() Options {
	if o.Timeout <= 0 {
		o.Timeout = DefaultTimeout
	}
	if o.MaxMessage <= 0 {
		o.MaxMessage = DefaultMaxMessage
	}
	if o.EventBuffer <= 0 {
		o.EventBuffer = DefaultEventBuffer
	}
	return o
}

// Stats are counters of a Monitor's reader.
type Stats struct {
	Events        uint64 // events received
	EventsDropped uint64 // event deliveries dropped because a subscriber was full
	StaleReplies  uint64 // replies with no waiting command (e.g. after a timeout)
	BadMessages   uint64 // malformed or oversized messages
}

// Monitor is a QMP connection to one QEMU. It is safe for concurrent use.
type Monitor struct {
	path     string
	opts     Options
	conn     *net.UnixConn
	cred     PeerCred
	greeting Greeting

	sem    chan struct{} // one command in flight
	nextID atomic.Uint64

	mu         sync.Mutex
	pending    map[string]*call
	subs       map[*subscriber]struct{}
	closed     bool  // reader has exited
	cause      error // why, once closed
	userClosed bool
	abortCause error // set when a write failure ended the connection

	done      chan struct{} // closed when the reader exits
	closeOnce sync.Once

	events, dropped, stale, bad atomic.Uint64
}

type call struct {
	name string
	ch   chan reply
}

type reply struct {
	line []byte
	msg  Message
	err  error
}

type subscriber struct {
	ch chan goqmp.Event
}

// Dial connects to the QMP socket at path: it refuses a symbolic link or a
// non-socket, reads the peer's credentials, checks Options.ExpectPID, reads
// the greeting and negotiates capabilities. The context bounds all of it
// (Options.Timeout when it has no deadline). The caller must Close the
// Monitor.
func Dial(ctx context.Context, path string, opts Options) (*Monitor, error) {
	opts = opts.withDefaults()
	ctx, cancel := withDefaultTimeout(ctx, opts.Timeout)
	defer cancel()

	conn, err := connectNoFollow(ctx, path)
	if err != nil {
		return nil, err
	}
	cred, err := peerCred(conn)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("qmp: %s: %w", path, err)
	}
	if opts.ExpectPID > 0 && cred.PID != opts.ExpectPID {
		conn.Close()
		return nil, fmt.Errorf("%w: %s is served by pid %d, expected %d", ErrPeerMismatch, path, cred.PID, opts.ExpectPID)
	}

	r := bufio.NewReaderSize(conn, 64<<10)
	if dl, ok := ctx.Deadline(); ok {
		conn.SetReadDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { conn.SetReadDeadline(time.Unix(1, 0)) })
	line, err := readLine(r, opts.MaxMessage)
	stopped := stop()
	if err == nil && !stopped {
		err = ctx.Err() // the deadline may already be poisoned
	}
	if err != nil {
		conn.Close()
		if ctx.Err() != nil || errors.Is(err, os.ErrDeadlineExceeded) {
			return nil, fmt.Errorf("qmp: %s (pid %d): no greeting before deadline (QEMU serves one QMP client at a time; is another client connected?): %w",
				path, cred.PID, context.DeadlineExceeded)
		}
		return nil, fmt.Errorf("qmp: %s (pid %d): read greeting: %w", path, cred.PID, err)
	}
	conn.SetReadDeadline(time.Time{})
	msg, err := DecodeMessage(line)
	if err == nil && msg.Kind != KindGreeting {
		err = fmt.Errorf("%w: expected greeting, got %s", errMalformed, msg.Kind)
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("qmp: %s (pid %d): greeting: %w", path, cred.PID, err)
	}

	m := &Monitor{
		path:     path,
		opts:     opts,
		conn:     conn,
		cred:     cred,
		greeting: msg.Greeting,
		sem:      make(chan struct{}, 1),
		pending:  map[string]*call{},
		subs:     map[*subscriber]struct{}{},
		done:     make(chan struct{}),
	}
	go m.readLoop(r)
	if err := m.Execute(ctx, "qmp_capabilities", nil, nil); err != nil {
		m.Close()
		return nil, fmt.Errorf("qmp: %s: handshake: %w", path, err)
	}
	return m, nil
}

func withDefaultTimeout(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, d)
}

// Path is the socket path the Monitor was dialed with.
func (m *Monitor) Path() string { return m.path }

// PeerCred is the kernel-recorded identity of the socket's listener.
func (m *Monitor) PeerCred() PeerCred { return m.cred }

// PeerPID is the PID of the process listening on the socket (QEMU).
func (m *Monitor) PeerPID() int { return m.cred.PID }

// PeerUID is the UID of the process listening on the socket.
func (m *Monitor) PeerUID() int { return m.cred.UID }

// Greeting is the banner QEMU sent on connect (version, capabilities).
func (m *Monitor) Greeting() Greeting { return m.greeting }

// Raw returns go-qemu's generated typed API on top of this Monitor. Its
// calls use Run, hence Options.Timeout.
func (m *Monitor) Raw() *raw.Monitor { return raw.NewMonitor(m) }

// Done is closed when the connection has ended; Err then says why.
func (m *Monitor) Done() <-chan struct{} { return m.done }

// Err is nil while connected, else why the connection ended (ErrClosed
// after Close, or an error wrapping ErrDisconnected).
func (m *Monitor) Err() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.closed {
		return nil
	}
	return m.cause
}

// Stats returns the reader's counters.
func (m *Monitor) Stats() Stats {
	return Stats{
		Events:        m.events.Load(),
		EventsDropped: m.dropped.Load(),
		StaleReplies:  m.stale.Load(),
		BadMessages:   m.bad.Load(),
	}
}

// Connect implements qmp.Monitor. A Monitor from Dial is already
// connected: Connect returns nil while it is, and the reason it is not once
// the connection has ended (a Monitor is never reconnected; Dial again).
func (m *Monitor) Connect() error { return m.Err() }

// Disconnect implements qmp.Monitor; it is Close.
func (m *Monitor) Disconnect() error { return m.Close() }

// Close ends the connection, fails pending calls with ErrClosed, closes
// event channels and waits for the reader to exit.
func (m *Monitor) Close() error {
	m.closeOnce.Do(func() {
		m.mu.Lock()
		m.userClosed = true
		m.mu.Unlock()
		m.conn.Close()
	})
	<-m.done
	return nil
}

// Run implements qmp.Monitor: RunContext with Options.Timeout.
func (m *Monitor) Run(command []byte) ([]byte, error) {
	return m.RunContext(context.Background(), command)
}

// RunContext sends one command, a JSON object with "execute" (and
// optionally "arguments"), and returns the whole reply message, as go-qemu's
// raw API expects. Any "id" in command is replaced by the Monitor's own. A
// QMP error reply is returned as *Error. The context's deadline bounds the
// wait for the monitor, the send and the reply (Options.Timeout when it has
// none).
func (m *Monitor) RunContext(ctx context.Context, command []byte) ([]byte, error) {
	line, _, err := m.run(ctx, command)
	return line, err
}

// Execute runs the command name with args (nil for none; anything
// json.Marshal accepts) and decodes its "return" value into out (nil to
// ignore it).
func (m *Monitor) Execute(ctx context.Context, name string, args, out any) error {
	b, err := json.Marshal(goqmp.Command{Execute: name, Args: args})
	if err != nil {
		return fmt.Errorf("qmp: %s: encode arguments: %w", name, err)
	}
	_, ret, err := m.run(ctx, b)
	if err != nil {
		return err
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(ret, out); err != nil {
		return fmt.Errorf("qmp: %s on %s: decode return value into %T: %w", name, m.path, out, err)
	}
	return nil
}

func (m *Monitor) run(ctx context.Context, command []byte) ([]byte, json.RawMessage, error) {
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(command, &obj); err != nil {
		return nil, nil, fmt.Errorf("qmp: command is not a JSON object: %w", err)
	}
	var name string
	if err := json.Unmarshal(obj["execute"], &name); err != nil || name == "" {
		return nil, nil, errors.New(`qmp: command has no "execute" name`)
	}
	id := "ars-" + strconv.FormatUint(m.nextID.Add(1), 10)
	obj["id"], _ = json.Marshal(id)
	payload, err := json.Marshal(obj)
	if err != nil {
		return nil, nil, fmt.Errorf("qmp: %s: encode: %w", name, err)
	}
	payload = append(payload, '\n')

	ctx, cancel := withDefaultTimeout(ctx, m.opts.Timeout)
	defer cancel()
	select {
	case m.sem <- struct{}{}:
	case <-ctx.Done():
		return nil, nil, fmt.Errorf("qmp: %s on %s: waiting for the command in flight: %w", name, m.path, ctx.Err())
	case <-m.done:
		return nil, nil, m.endedErr(name)
	}
	defer func() { <-m.sem }()

	ch := make(chan reply, 1)
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil, nil, m.endedErr(name)
	}
	m.pending[id] = &call{name: name, ch: ch}
	m.mu.Unlock()
	forget := func() {
		m.mu.Lock()
		delete(m.pending, id)
		m.mu.Unlock()
	}

	dl, _ := ctx.Deadline()
	m.conn.SetWriteDeadline(dl)
	if _, err := m.conn.Write(payload); err != nil {
		forget()
		// A partial write leaves the stream unusable: end the connection.
		m.mu.Lock()
		if m.abortCause == nil {
			m.abortCause = fmt.Errorf("send %s: %w", name, err)
		}
		m.mu.Unlock()
		m.conn.Close()
		<-m.done
		return nil, nil, m.endedErr(name)
	}

	select {
	case r := <-ch:
		return m.finish(name, r)
	case <-ctx.Done():
		forget()
		select {
		case r := <-ch:
			return m.finish(name, r)
		default:
		}
		return nil, nil, fmt.Errorf("qmp: %s on %s (pid %d): no reply: %w", name, m.path, m.cred.PID, ctx.Err())
	case <-m.done:
		select {
		case r := <-ch:
			return m.finish(name, r)
		default:
		}
		return nil, nil, m.endedErr(name)
	}
}

func (m *Monitor) finish(name string, r reply) ([]byte, json.RawMessage, error) {
	if r.err != nil {
		return nil, nil, fmt.Errorf("qmp: %s on %s: reply: %w", name, m.path, r.err)
	}
	if r.msg.Kind == KindError {
		return nil, nil, &Error{Command: name, Class: r.msg.Class, Desc: r.msg.Desc}
	}
	return r.line, r.msg.Return, nil
}

func (m *Monitor) endedErr(name string) error {
	return fmt.Errorf("%s on %s: %w", name, m.path, m.Err())
}

// Events implements qmp.Monitor: it returns a new channel that receives
// every event from now on until ctx is done or the connection ends, when it
// is closed. If the channel is full the event is dropped for this
// subscriber and counted in Stats().EventsDropped.
func (m *Monitor) Events(ctx context.Context) (<-chan goqmp.Event, error) {
	s := &subscriber{ch: make(chan goqmp.Event, m.opts.EventBuffer)}
	m.mu.Lock()
	if m.closed {
		err := m.cause
		m.mu.Unlock()
		return nil, fmt.Errorf("events on %s: %w", m.path, err)
	}
	m.subs[s] = struct{}{}
	m.mu.Unlock()
	context.AfterFunc(ctx, func() {
		m.mu.Lock()
		defer m.mu.Unlock()
		if _, ok := m.subs[s]; ok {
			delete(m.subs, s)
			close(s.ch)
		}
	})
	return s.ch, nil
}

// readLoop is the only reader of the connection.
func (m *Monitor) readLoop(r *bufio.Reader) {
	var cause error
	for {
		line, err := readLine(r, m.opts.MaxMessage)
		if err != nil {
			if errors.Is(err, ErrTooLarge) {
				m.bad.Add(1)
				m.failPending(err)
				continue
			}
			cause = err
			break
		}
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		msg, err := DecodeMessage(line)
		if err == nil && msg.Kind == KindGreeting {
			err = fmt.Errorf("%w: unexpected greeting", errMalformed)
		}
		if err != nil {
			m.bad.Add(1)
			m.failPending(err)
			continue
		}
		if msg.Kind == KindEvent {
			m.dispatch(msg.Event)
			continue
		}
		m.deliver(line, msg)
	}
	m.shutdown(cause)
}

func (m *Monitor) dispatch(ev goqmp.Event) {
	m.events.Add(1)
	m.mu.Lock()
	defer m.mu.Unlock()
	for s := range m.subs {
		select {
		case s.ch <- ev:
		default:
			m.dropped.Add(1)
		}
	}
}

func (m *Monitor) deliver(line []byte, msg Message) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var c *call
	var id string
	if msg.HasID {
		c, id = m.pending[msg.ID], msg.ID
	} else if len(m.pending) == 1 {
		// A reply without id (QEMU could not parse the command far enough
		// to see it) belongs to the only command in flight.
		for k, v := range m.pending {
			id, c = k, v
		}
	}
	if c == nil {
		m.stale.Add(1)
		return
	}
	delete(m.pending, id)
	c.ch <- reply{line: line, msg: msg}
}

// failPending fails the command in flight when the message that should have
// been its reply is unusable. The stream stays in sync (messages are lines).
func (m *Monitor) failPending(err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for id, c := range m.pending {
		delete(m.pending, id)
		c.ch <- reply{err: err}
	}
}

func (m *Monitor) shutdown(readErr error) {
	m.conn.Close()
	m.mu.Lock()
	switch {
	case m.userClosed:
		m.cause = ErrClosed
	case m.abortCause != nil:
		m.cause = fmt.Errorf("%w: %v", ErrDisconnected, m.abortCause)
	default:
		if errors.Is(readErr, io.EOF) {
			readErr = fmt.Errorf("peer (pid %d) closed the connection", m.cred.PID)
		}
		m.cause = fmt.Errorf("%w: %v", ErrDisconnected, readErr)
	}
	m.closed = true
	for id := range m.pending {
		delete(m.pending, id) // their callers see done
	}
	for s := range m.subs {
		delete(m.subs, s)
		close(s.ch)
	}
	m.mu.Unlock()
	close(m.done)
}

// readLine reads one newline-terminated message of at most max bytes. A
// longer one is consumed up to its newline and reported as ErrTooLarge, so
// the stream stays in sync.
func readLine(r *bufio.Reader, max int) ([]byte, error) {
	var buf []byte
	for {
		frag, err := r.ReadSlice('\n')
		if len(buf)+len(frag) > max {
			n := len(buf) + len(frag)
			for errors.Is(err, bufio.ErrBufferFull) {
				frag, err = r.ReadSlice('\n')
				n += len(frag)
			}
			if err != nil {
				return nil, err
			}
			return nil, fmt.Errorf("%w: %d bytes > %d", ErrTooLarge, n, max)
		}
		buf = append(buf, frag...)
		switch {
		case err == nil:
			return buf, nil
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		case errors.Is(err, io.EOF) && len(buf) > 0:
			return nil, fmt.Errorf("truncated message at end of stream: %w", io.ErrUnexpectedEOF)
		default:
			return nil, err
		}
	}
}
