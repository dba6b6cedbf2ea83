package collector

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"runtime"
	"sync"
	"syscall"
	"time"

	"github.com/ars-dev/ars/agent/telemetry"
	"github.com/ars-dev/ars/ipc"
)

// Options say how to run the collector process.
type Options struct {
	// Exe and Args start the collector (arsd: os.Executable(), "collector"
	// and its flags). The child gets the socket as fd 3.
	Exe   string
	Argv0 string // argv[0] shown by ps (default Exe)
	Args  []string
	// StartTimeout bounds one start (exec, handshake, hello); default 20 s.
	StartTimeout time.Duration
	// RequestTimeout bounds one request (default 5 s).
	RequestTimeout time.Duration
	// RestartDelay is the first pause before restarting a dead collector
	// (default 1 s, doubling to 30 s while it keeps dying at once).
	RestartDelay time.Duration
	Stderr       io.Writer // the child's stderr (default os.Stderr)
	Log          *slog.Logger
}

// Client is the engine's stand-in for the telemetry: it implements
// agent.RunqSource and agent.VMTracker, prometheus.Collector (the
// collector's telemetry metrics) and offers a wake channel for spikes.
// It supervises the collector process and restarts it when it dies. Safe
// for concurrent use.
type Client struct {
	opts Options
	log  *slog.Logger
	wake chan struct{}

	mu       sync.Mutex // one request at a time; guards everything below
	inc      *incarnation
	nextID   uint64
	threads  map[uint32][2]uint32 // tid → vm, vcpu slot (replayed after a restart)
	vms      map[uint32]telemetry.VMRef
	probes   []telemetry.ProbeStatus
	restarts int
	lastErr  error

	spawn  chan func() // run on the spawner's locked thread (see spawner)
	done   chan struct{}
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// incarnation is one running collector process.
type incarnation struct {
	cmd     *exec.Cmd
	conn    *net.UnixConn
	cons    *ipc.Consumer
	samples chan sampleMsg
	hello   chan hello
	exited  chan struct{} // closed when the process is gone and reaped
	dead    chan struct{} // closed when the ring or the socket failed
	deadErr error
	once    sync.Once
}

type sampleMsg struct {
	id uint64
	m  map[uint32]telemetry.VCPUStats
}

func (in *incarnation) die(err error) {
	in.once.Do(func() {
		in.deadErr = err
		close(in.dead)
	})
}

// Start runs the collector and waits until it has loaded its probes and
// handed its ring over. An error means no collector could start (the
// caller may fall back to in-process telemetry); later deaths are
// handled by restarting it until Close.
func Start(ctx context.Context, opts Options) (*Client, error) {
	if opts.StartTimeout == 0 {
		opts.StartTimeout = 20 * time.Second
	}
	if opts.RequestTimeout == 0 {
		opts.RequestTimeout = 5 * time.Second
	}
	if opts.RestartDelay == 0 {
		opts.RestartDelay = time.Second
	}
	if opts.Stderr == nil {
		opts.Stderr = os.Stderr
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	c := &Client{opts: opts, log: opts.Log, wake: make(chan struct{}, 1), spawn: make(chan func()),
		threads: map[uint32][2]uint32{}, vms: map[uint32]telemetry.VMRef{}, done: make(chan struct{})}
	go c.spawner()
	in, probes, err := c.start(ctx)
	if err != nil {
		close(c.done)
		return nil, err
	}
	c.inc, c.probes = in, probes
	sctx, cancel := context.WithCancel(context.Background())
	c.cancel = cancel
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		c.supervise(sctx, in)
	}()
	return c, nil
}

// start launches one collector, completes the handshake and waits for
// its hello (the probes' status).
func (c *Client) start(ctx context.Context) (*incarnation, []telemetry.ProbeStatus, error) {
	ctx, cancel := context.WithTimeout(ctx, c.opts.StartTimeout)
	defer cancel()
	// A fresh abstract socket the child dials: SO_PEERCRED then names the
	// real peer on both ends (a socketpair would name its creator twice).
	// Anyone may connect to an abstract name; only the child's pid is
	// accepted.
	var rnd [8]byte
	rand.Read(rnd[:])
	name := fmt.Sprintf("@ars-collector-%d-%x", os.Getpid(), rnd)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: name, Net: "unix"})
	if err != nil {
		return nil, nil, fmt.Errorf("collector: listen: %w", err)
	}
	defer ln.Close()
	cmd := exec.Command(c.opts.Exe, append(append([]string(nil), c.opts.Args...), "--engine-socket", name)...)
	if c.opts.Argv0 != "" {
		cmd.Args[0] = c.opts.Argv0
	}
	cmd.Stdout, cmd.Stderr = c.opts.Stderr, c.opts.Stderr
	// The collector dies with the engine's thread that started it; it
	// also exits on its own when the socket hangs up.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := c.startOnSpawner(cmd); err != nil {
		return nil, nil, fmt.Errorf("collector: start %s: %w", c.opts.Exe, err)
	}
	exited := make(chan struct{})
	var waitErr error
	go func() {
		waitErr = cmd.Wait()
		close(exited)
	}()
	conn, err := acceptChild(ctx, ln, cmd.Process.Pid, exited)
	if err != nil {
		cmd.Process.Kill()
		<-exited
		if waitErr != nil {
			err = fmt.Errorf("%w (collector: %v)", err, waitErr)
		}
		return nil, nil, fmt.Errorf("collector: %w", err)
	}
	in := &incarnation{cmd: cmd, conn: conn, samples: make(chan sampleMsg, 1), hello: make(chan hello, 1),
		exited: make(chan struct{}), dead: make(chan struct{})}
	go func() {
		<-exited
		in.die(fmt.Errorf("collector pid %d exited: %v", cmd.Process.Pid, waitErr))
		close(in.exited)
	}()
	fail := func(err error) (*incarnation, []telemetry.ProbeStatus, error) {
		conn.Close()
		if in.cons != nil {
			in.cons.Interrupt() // readRing closes it
		}
		cmd.Process.Kill()
		<-in.exited
		return nil, nil, err
	}
	type recv struct {
		cons *ipc.Consumer
		err  error
	}
	rc := make(chan recv, 1)
	go func() {
		cons, _, err := ipc.ReceiveRing(ctx, conn, EngineChild(cmd.Process.Pid), ipc.RingConfig{Spin: 256})
		rc <- recv{cons, err}
	}()
	var r recv
	select {
	case r = <-rc:
	case <-in.exited:
		conn.Close()
		r = <-rc
		if r.err == nil {
			r.cons.Close()
			r.err = errors.New("exited during the handshake")
		}
		return nil, nil, fmt.Errorf("collector: %w (%v)", r.err, in.deadErr)
	}
	if r.err != nil {
		return fail(fmt.Errorf("collector: handshake: %w", r.err))
	}
	in.cons = r.cons
	go c.readRing(in)
	// The first frame is the hello with the probes' status.
	select {
	case h := <-in.hello:
		c.log.Info("collector up", "pid", h.PID, "uid", h.UID, "cap_eff", h.CapEff)
		return in, fromWire(h.Probes), nil
	case <-in.dead:
		return fail(fmt.Errorf("collector: before its hello: %v", in.deadErr))
	case <-ctx.Done():
		return fail(fmt.Errorf("collector: no hello: %w", ctx.Err()))
	}
}

// spawner owns one locked OS thread for the Client's life and forks every
// collector from it: the parent-death signal fires when the forking
// thread exits, and the Go runtime may end an ordinary thread at any time
// (golang/go#27505), which would kill a healthy collector.
func (c *Client) spawner() {
	runtime.LockOSThread() // never unlocked: the thread exits with the goroutine, after Close
	for {
		select {
		case f := <-c.spawn:
			f()
		case <-c.done:
			return
		}
	}
}

func (c *Client) startOnSpawner(cmd *exec.Cmd) error {
	errc := make(chan error, 1)
	select {
	case c.spawn <- func() { errc <- cmd.Start() }:
		return <-errc
	case <-c.done:
		return errors.New("client closed")
	}
}

// acceptChild accepts connections on ln until one comes from pid.
func acceptChild(ctx context.Context, ln *net.UnixListener, pid int, exited <-chan struct{}) (*net.UnixConn, error) {
	if dl, ok := ctx.Deadline(); ok {
		ln.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { ln.SetDeadline(time.Now()) })
	defer stop()
	go func() {
		select {
		case <-exited:
			ln.SetDeadline(time.Now())
		case <-ctx.Done():
		}
	}()
	for {
		conn, err := ln.AcceptUnix()
		if err != nil {
			return nil, fmt.Errorf("wait for the collector to connect: %w", err)
		}
		p, err := ipc.PeerOf(conn)
		if err == nil && int(p.PID) == pid {
			return conn, nil
		}
		conn.Close() // somebody else found the abstract name
	}
}

// EngineChild authorizes exactly the process pid as the collector end.
func EngineChild(pid int) ipc.Authorizer {
	return func(p ipc.Peer, _ string) error {
		if int(p.PID) != pid {
			return fmt.Errorf("peer pid %d is not our collector (pid %d)", p.PID, pid)
		}
		return nil
	}
}

// readRing delivers the hello, samples and spikes until the ring fails
// or is interrupted; it owns the consumer and closes it.
func (c *Client) readRing(in *incarnation) {
	defer in.cons.Close()
	var buf []byte
	for {
		b, err := in.cons.ReadFrameAppend(buf[:0])
		if err != nil {
			in.die(fmt.Errorf("collector ring: %w", err))
			return
		}
		buf = b
		e, err := ipc.DecodeEnvelope(b)
		if err != nil {
			in.die(fmt.Errorf("collector ring: %w", err))
			return
		}
		switch e.Type {
		case ipc.FrameHello:
			var h hello
			if err := json.Unmarshal(e.Payload, &h); err != nil {
				in.die(fmt.Errorf("collector ring: hello: %w", err))
				return
			}
			select {
			case in.hello <- h:
			default:
			}
		case ipc.FrameSamples:
			id, m, err := decodeSamples(e.Payload)
			if err != nil {
				in.die(fmt.Errorf("collector ring: %w", err))
				return
			}
			select { // keep only the newest
			case <-in.samples:
			default:
			}
			in.samples <- sampleMsg{id, m}
		case ipc.FrameSpike:
			if _, err := decodeSpike(e.Payload); err != nil {
				in.die(fmt.Errorf("collector ring: %w", err))
				return
			}
			select {
			case c.wake <- struct{}{}:
			default: // a wake-up is pending already
			}
		}
	}
}

// supervise waits for the collector's death, reports it and restarts it.
func (c *Client) supervise(ctx context.Context, in *incarnation) {
	delay := c.opts.RestartDelay
	for {
		select {
		case <-ctx.Done():
			return
		case <-in.dead:
		}
		started := time.Now()
		c.mu.Lock()
		c.lastErr = in.deadErr
		c.inc = nil
		c.mu.Unlock()
		c.log.Error("collector died; telemetry is down until it restarts", "err", in.deadErr, "restart_in", delay)
		in.conn.Close()
		in.cmd.Process.Kill()
		select {
		case <-in.exited:
		case <-time.After(5 * time.Second):
		}
		in.cons.Interrupt()
		for {
			select {
			case <-ctx.Done():
				return
			case <-time.After(delay):
			}
			nin, probes, err := c.start(ctx)
			if err == nil {
				c.mu.Lock()
				c.inc, c.probes = nin, probes
				c.restarts++
				n := c.restarts
				c.replayLocked(nin)
				c.mu.Unlock()
				c.log.Info("collector restarted", "pid", nin.cmd.Process.Pid, "restarts", n)
				in = nin
				break
			}
			c.log.Error("collector restart failed", "err", err)
			delay = min(2*delay, 30*time.Second)
		}
		if time.Since(started) > time.Minute {
			delay = c.opts.RestartDelay
		}
	}
}

// replayLocked tracks again, in a fresh collector, everything tracked.
func (c *Client) replayLocked(in *incarnation) {
	for slot, ref := range c.vms {
		r := ref
		if err := c.callLocked(in, request{Op: opTrackVM, VM: slot, Ref: &r}, nil); err != nil {
			c.log.Warn("collector restart: track vm", "slot", slot, "err", err)
		}
	}
	for tid, s := range c.threads {
		if err := c.callLocked(in, request{Op: opTrack, TID: tid, VM: s[0], VCPU: s[1]}, nil); err != nil {
			c.log.Warn("collector restart: track", "tid", tid, "err", err)
		}
	}
}

// callLocked sends one request and reads its reply (c.mu held).
func (c *Client) callLocked(in *incarnation, req request, rep *reply) error {
	c.nextID++
	req.ID = c.nextID
	b, err := json.Marshal(req)
	if err != nil {
		return err
	}
	in.conn.SetDeadline(time.Now().Add(c.opts.RequestTimeout))
	defer in.conn.SetDeadline(time.Time{})
	if err := ipc.WriteFrame(in.conn, b); err != nil {
		in.die(fmt.Errorf("collector socket: %w", err))
		return fmt.Errorf("collector: %s: %w", req.Op, err)
	}
	rb, err := ipc.ReadFrame(in.conn)
	if err != nil {
		in.die(fmt.Errorf("collector socket: %w", err))
		return fmt.Errorf("collector: %s: %w", req.Op, err)
	}
	var r reply
	if err := json.Unmarshal(rb, &r); err != nil {
		in.die(fmt.Errorf("collector socket: malformed reply: %w", err))
		return fmt.Errorf("collector: %s: malformed reply: %w", req.Op, err)
	}
	if r.ID != req.ID {
		in.die(fmt.Errorf("collector socket: reply %d to request %d", r.ID, req.ID))
		return fmt.Errorf("collector: %s: out-of-order reply", req.Op)
	}
	if rep != nil {
		*rep = r
	}
	if r.Error != "" {
		return fmt.Errorf("collector: %s: %s", req.Op, r.Error)
	}
	return nil
}

// errDown is returned by Read while no collector runs.
func (c *Client) errDownLocked() error {
	return fmt.Errorf("collector down (restarting): %v", c.lastErr)
}

// Track implements agent.RunqSource. While the collector is down the
// thread is remembered and tracked when it is back.
func (c *Client) Track(tid, vmSlot, vcpuSlot uint32) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.threads[tid] = [2]uint32{vmSlot, vcpuSlot}
	if c.inc == nil {
		return nil
	}
	return c.callLocked(c.inc, request{Op: opTrack, TID: tid, VM: vmSlot, VCPU: vcpuSlot}, nil)
}

// Untrack implements agent.RunqSource.
func (c *Client) Untrack(tid uint32) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.threads, tid)
	if c.inc == nil {
		return nil
	}
	return c.callLocked(c.inc, request{Op: opUntrack, TID: tid}, nil)
}

// TrackVM implements agent.VMTracker.
func (c *Client) TrackVM(vmSlot uint32, vm telemetry.VMRef) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.vms[vmSlot] = vm
	if c.inc == nil {
		return nil
	}
	return c.callLocked(c.inc, request{Op: opTrackVM, VM: vmSlot, Ref: &vm}, nil)
}

// UntrackVM implements agent.VMTracker.
func (c *Client) UntrackVM(vmSlot uint32) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.vms, vmSlot)
	if c.inc == nil {
		return nil
	}
	return c.callLocked(c.inc, request{Op: opUntrackVM, VM: vmSlot}, nil)
}

// Read implements agent.RunqSource: the collector reads its maps now and
// streams the result over the ring.
func (c *Client) Read() (map[uint32]telemetry.VCPUStats, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	in := c.inc
	if in == nil {
		return nil, c.errDownLocked()
	}
	if err := c.callLocked(in, request{Op: opRead}, nil); err != nil {
		return nil, err
	}
	id := c.nextID
	timeout := time.NewTimer(c.opts.RequestTimeout)
	defer timeout.Stop()
	for {
		select {
		case s := <-in.samples:
			if s.id == id {
				return s.m, nil
			}
		case <-in.dead:
			return nil, fmt.Errorf("collector: read: %v", in.deadErr)
		case <-timeout.C:
			return nil, fmt.Errorf("collector: read: no samples within %v", c.opts.RequestTimeout)
		}
	}
}

// Wake delivers a (coalesced) signal for every run-queue delay spike.
func (c *Client) Wake() <-chan struct{} { return c.wake }

// Status is the probes' status as the last collector reported it.
func (c *Client) Status() []telemetry.ProbeStatus {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]telemetry.ProbeStatus(nil), c.probes...)
}

// PID is the running collector's process id (0 while down).
func (c *Client) PID() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.inc == nil {
		return 0
	}
	return c.inc.cmd.Process.Pid
}

// Restarts counts collector restarts so far.
func (c *Client) Restarts() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.restarts
}

// Close stops supervising and stops the collector (it exits on the
// socket's hang-up; SIGKILL after 5 s).
func (c *Client) Close() error {
	c.cancel()
	c.wg.Wait()
	defer close(c.done) // ends the spawner thread: after the collector is gone
	c.mu.Lock()
	in := c.inc
	c.inc = nil
	c.mu.Unlock()
	if in == nil {
		return nil
	}
	in.conn.Close()
	select {
	case <-in.exited:
	case <-time.After(5 * time.Second):
		in.cmd.Process.Kill()
		<-in.exited
	}
	in.cons.Interrupt()
	return nil
}
