package qmpact

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ars-dev/ars/agent/qmp"
	goqmp "github.com/digitalocean/go-qemu/qmp"
	"golang.org/x/sys/unix"
)

// Reconnecting is a QMP connection that survives the loss of its socket
// connection: when the current *qmp.Monitor has ended (qmp.ErrDisconnected,
// or someone closed it), the next command redials the same path, with the
// same options (so the same symlink refusal and expected peer PID), with
// exponential backoff bounded by that command's context. A command that
// failed because the connection dropped under it is re-sent once on the
// new connection only if it is idempotent (queries, balloon,
// block_set_io_throttle, qom-*); device_add and device_del are not re-sent.
//
// Events(ctx) channels survive reconnects; each new connection is
// announced on them with a synthetic EventReconnected, since events sent
// while disconnected are lost.
type Reconnecting struct {
	path string
	opts qmp.Options

	// MinBackoff and MaxBackoff bound the wait between redials.
	MinBackoff, MaxBackoff time.Duration

	dialMu sync.Mutex // one redial at a time

	mu     sync.Mutex
	mon    *qmp.Monitor
	closed bool
	subs   map[chan goqmp.Event]struct{}

	pumpCtx    context.Context
	pumpCancel context.CancelFunc
	pumps      sync.WaitGroup

	reconnects atomic.Uint64
	dropped    atomic.Uint64
}

// EventReconnected is the synthetic event Reconnecting sends to its
// subscribers after each redial.
const EventReconnected = "ARS_QMP_RECONNECTED"

// ErrClosed is returned by a Reconnecting after Close.
var ErrClosed = errors.New("qmpact: connection closed")

// DialReconnecting dials path (see qmp.Dial) and returns a connection that
// redials it when lost. opts.ExpectPID should be the discovered QEMU's PID.
func DialReconnecting(ctx context.Context, path string, opts qmp.Options) (*Reconnecting, error) {
	m, err := qmp.Dial(ctx, path, opts)
	if err != nil {
		return nil, err
	}
	if opts.ExpectPID <= 0 {
		opts.ExpectPID = m.PeerPID() // a redial must reach the same QEMU
	}
	pctx, cancel := context.WithCancel(context.Background())
	r := &Reconnecting{
		path: path, opts: opts,
		MinBackoff: 50 * time.Millisecond, MaxBackoff: 2 * time.Second,
		subs:    map[chan goqmp.Event]struct{}{},
		pumpCtx: pctx, pumpCancel: cancel,
	}
	r.install(m, false)
	return r, nil
}

// Reconnects is how many times the connection was re-established.
func (r *Reconnecting) Reconnects() uint64 { return r.reconnects.Load() }

// Monitor returns the current connection (possibly ended).
func (r *Reconnecting) Monitor() *qmp.Monitor {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.mon
}

// install makes m current and starts its event pump.
func (r *Reconnecting) install(m *qmp.Monitor, redial bool) {
	r.mu.Lock()
	r.mon = m
	r.mu.Unlock()
	evs, err := m.Events(r.pumpCtx)
	if err != nil {
		return // already ended; the next command redials
	}
	r.pumps.Add(1)
	go func() {
		defer r.pumps.Done()
		for ev := range evs {
			r.fanout(ev)
		}
	}()
	if redial {
		r.reconnects.Add(1)
		r.fanout(goqmp.Event{Event: EventReconnected, Data: map[string]any{"pid": float64(m.PeerPID())}})
	}
}

func (r *Reconnecting) fanout(ev goqmp.Event) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for ch := range r.subs {
		select {
		case ch <- ev:
		default:
			r.dropped.Add(1)
		}
	}
}

// Events returns a channel of events from every connection until ctx ends
// or Close; a full channel loses events.
func (r *Reconnecting) Events(ctx context.Context) (<-chan goqmp.Event, error) {
	ch := make(chan goqmp.Event, qmp.DefaultEventBuffer)
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil, ErrClosed
	}
	r.subs[ch] = struct{}{}
	r.mu.Unlock()
	context.AfterFunc(ctx, func() {
		r.mu.Lock()
		defer r.mu.Unlock()
		if _, ok := r.subs[ch]; ok {
			delete(r.subs, ch)
			close(ch)
		}
	})
	return ch, nil
}

// Close closes the current connection, stops redialing and closes event
// channels.
func (r *Reconnecting) Close() error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil
	}
	r.closed = true
	m := r.mon
	r.mu.Unlock()
	r.pumpCancel()
	r.dialMu.Lock() // wait out a redial in progress
	defer r.dialMu.Unlock()
	if cur := r.Monitor(); cur != nil {
		m = cur
	}
	if m != nil {
		m.Close()
	}
	r.pumps.Wait()
	r.mu.Lock()
	for ch := range r.subs {
		delete(r.subs, ch)
		close(ch)
	}
	r.mu.Unlock()
	return nil
}

// current returns a live monitor, redialing if the current one ended.
func (r *Reconnecting) current(ctx context.Context) (*qmp.Monitor, error) {
	r.mu.Lock()
	m, closed := r.mon, r.closed
	r.mu.Unlock()
	if closed {
		return nil, ErrClosed
	}
	if m != nil && m.Err() == nil {
		return m, nil
	}
	r.dialMu.Lock()
	defer r.dialMu.Unlock()
	r.mu.Lock()
	m, closed = r.mon, r.closed
	r.mu.Unlock()
	if closed {
		return nil, ErrClosed
	}
	if m != nil && m.Err() == nil {
		return m, nil // someone else redialed
	}
	backoff := r.MinBackoff
	var last error
	for attempt := 0; ; attempt++ {
		if r.opts.ExpectPID > 0 && unix.Kill(r.opts.ExpectPID, 0) == unix.ESRCH {
			return nil, fmt.Errorf("%w: QEMU pid %d no longer exists", ErrVMGone, r.opts.ExpectPID)
		}
		nm, err := qmp.Dial(ctx, r.path, r.opts)
		if err == nil {
			r.mu.Lock()
			if r.closed {
				r.mu.Unlock()
				nm.Close()
				return nil, ErrClosed
			}
			r.mu.Unlock()
			r.install(nm, true)
			return nm, nil
		}
		last = err
		if errors.Is(err, qmp.ErrPeerMismatch) || errors.Is(err, qmp.ErrSymlink) || errors.Is(err, qmp.ErrNotSocket) {
			return nil, fmt.Errorf("qmpact: redial %s refused: %w", r.path, err)
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("qmpact: redial %s: %d attempts, last error %v: %w", r.path, attempt+1, last, ctx.Err())
		case <-t.C:
		}
		backoff = min(2*backoff, r.MaxBackoff)
	}
}

// Execute runs a command on the current connection, redialing first if it
// has been lost; see the type's comment for when a command is re-sent.
func (r *Reconnecting) Execute(ctx context.Context, name string, args, out any) error {
	m, err := r.current(ctx)
	if err != nil {
		return fmt.Errorf("qmp: %s: %w", name, err)
	}
	err = m.Execute(ctx, name, args, out)
	if err == nil || !(errors.Is(err, qmp.ErrDisconnected) || errors.Is(err, qmp.ErrClosed)) || !isIdempotent(name) {
		return err
	}
	m, rerr := r.current(ctx)
	if rerr != nil {
		return fmt.Errorf("%w; reconnect: %w", err, rerr)
	}
	return m.Execute(ctx, name, args, out)
}
