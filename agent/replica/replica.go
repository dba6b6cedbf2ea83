// Package replica owns the replication stream from the active agent to
// its standbys on the same host: the active publishes, on a Unix socket
// (root peers only, ipc frames of JSON), its epoch, the DRM snapshot with
// its generation whenever the generation changes, and the audit chain's
// head, at least every heartbeat; a standby keeps the latest as a hot
// copy and reports how far behind it is (ars_replica_* metrics). On
// takeover the new active starts from the hot copy's view and reconciles
// it against the host on its first tick.
package replica

import (
	"context"
	"encoding/json"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ars-dev/ars/agent/executor"
	"github.com/ars-dev/ars/ipc"
	"github.com/ars-dev/ars/mapper"
)

// Frame is one message of the stream.
type Frame struct {
	Epoch  uint64 `json:"epoch"`
	Holder string `json:"holder"`
	// Generation is the DRM's generation at the time of sending; DRM is
	// set only when it changed since the last frame on this connection.
	Generation uint64           `json:"generation"`
	DRM        *mapper.Snapshot `json:"drm,omitempty"`
	AuditHead  executor.Head    `json:"audit_head"`
	Sent       time.Time        `json:"sent"`
}

// State is what the active publishes.
type State func() (epoch uint64, drm mapper.Snapshot, head executor.Head)

// Publisher serves the stream.
type Publisher struct {
	Path      string
	Holder    string
	State     State
	Interval  time.Duration // how often the generation is looked at (default 20 ms)
	Heartbeat time.Duration // a frame at least this often (default 500 ms)
	Log       *slog.Logger
}

// Serve listens on Path (replacing a stale socket) until ctx ends.
func (p *Publisher) Serve(ctx context.Context) error {
	if p.Interval <= 0 {
		p.Interval = 20 * time.Millisecond
	}
	if p.Heartbeat <= 0 {
		p.Heartbeat = 500 * time.Millisecond
	}
	if p.Log == nil {
		p.Log = slog.New(slog.DiscardHandler)
	}
	if fi, err := os.Lstat(p.Path); err == nil {
		if fi.Mode().Type() != fs.ModeSocket {
			return fmt.Errorf("replica: %s exists and is not a socket", p.Path)
		}
		os.Remove(p.Path) // a previous active's; only the lease holder serves
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: p.Path, Net: "unix"})
	if err != nil {
		return fmt.Errorf("replica: %w", err)
	}
	ln.SetUnlinkOnClose(true)
	os.Chmod(p.Path, 0o600)
	var wg sync.WaitGroup
	defer wg.Wait()
	go func() { <-ctx.Done(); ln.Close() }()
	for {
		c, err := ln.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("replica: accept: %w", err)
		}
		peer, err := ipc.PeerOf(c)
		if err == nil {
			err = ipc.RootOnly(peer, "replica")
		}
		if err != nil {
			p.Log.Warn("replication peer refused", "err", err)
			c.Close()
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			if err := p.stream(ctx, c); err != nil && ctx.Err() == nil {
				p.Log.Info("standby disconnected", "pid", peer.PID, "err", err)
			}
		}()
	}
}

func (p *Publisher) stream(ctx context.Context, c net.Conn) error {
	go func() { <-ctx.Done(); c.Close() }()
	t := time.NewTicker(p.Interval)
	defer t.Stop()
	var lastGen uint64
	var lastSent time.Time
	first := true
	for {
		epoch, snap, head := p.State()
		if first || snap.Generation != lastGen || time.Since(lastSent) >= p.Heartbeat {
			f := Frame{Epoch: epoch, Holder: p.Holder, Generation: snap.Generation, AuditHead: head, Sent: time.Now()}
			if first || snap.Generation != lastGen {
				f.DRM = &snap
			}
			b, err := json.Marshal(f)
			if err != nil {
				return fmt.Errorf("replica: encode: %w", err)
			}
			c.SetWriteDeadline(time.Now().Add(2 * time.Second))
			if err := ipc.WriteFrame(c, b); err != nil {
				return err
			}
			first, lastGen, lastSent = false, snap.Generation, time.Now()
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// Follower is a standby's end: a hot copy of the active's state.
type Follower struct {
	Path string
	Log  *slog.Logger

	mu        sync.Mutex
	connected bool
	last      Frame // the newest frame
	drm       mapper.Snapshot
	received  time.Time // when last arrived
	frames    uint64
}

// Run connects (and reconnects) to the active until ctx ends.
func (f *Follower) Run(ctx context.Context) {
	if f.Log == nil {
		f.Log = slog.New(slog.DiscardHandler)
	}
	for ctx.Err() == nil {
		if err := f.follow(ctx); err != nil && ctx.Err() == nil {
			f.Log.Debug("replication stream", "err", err)
		}
		f.mu.Lock()
		f.connected = false
		f.mu.Unlock()
		select {
		case <-ctx.Done():
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (f *Follower) follow(ctx context.Context) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", f.Path)
	if err != nil {
		return fmt.Errorf("replica: %w", err)
	}
	defer c.Close()
	go func() { <-ctx.Done(); c.Close() }()
	f.mu.Lock()
	f.connected = true
	f.mu.Unlock()
	for {
		c.SetReadDeadline(time.Now().Add(3 * time.Second)) // heartbeats come every 500 ms
		b, err := ipc.ReadFrame(c)
		if err != nil {
			return err
		}
		var fr Frame
		if err := json.Unmarshal(b, &fr); err != nil {
			return fmt.Errorf("replica: decode: %w", err)
		}
		f.mu.Lock()
		if fr.DRM != nil {
			f.drm = *fr.DRM
		}
		f.last, f.received = fr, time.Now()
		f.frames++
		f.mu.Unlock()
	}
}

// Copy is the hot copy.
type Copy struct {
	Epoch     uint64
	Holder    string
	DRM       mapper.Snapshot
	AuditHead executor.Head
	// Lag is how old the newest frame is (0 when none was received).
	Lag       time.Duration
	Connected bool
	Frames    uint64
}

// Hot returns the hot copy.
func (f *Follower) Hot() Copy {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := Copy{Epoch: f.last.Epoch, Holder: f.last.Holder, DRM: f.drm, AuditHead: f.last.AuditHead,
		Connected: f.connected, Frames: f.frames}
	if !f.last.Sent.IsZero() {
		c.Lag = time.Since(f.last.Sent)
	}
	return c
}

func (f *Follower) descs() [4]*prometheus.Desc {
	return [4]*prometheus.Desc{
		prometheus.NewDesc("ars_replica_lag_seconds", "Age of the newest replication frame from the active (standby only).", nil, nil),
		prometheus.NewDesc("ars_replica_generation", "DRM generation of the standby's hot copy.", nil, nil),
		prometheus.NewDesc("ars_replica_connected", "1 while the standby is connected to the active's replication stream.", nil, nil),
		prometheus.NewDesc("ars_replica_frames_total", "Replication frames received.", nil, nil),
	}
}

// Describe implements prometheus.Collector.
func (f *Follower) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range f.descs() {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (f *Follower) Collect(ch chan<- prometheus.Metric) {
	d, h := f.descs(), f.Hot()
	conn := 0.0
	if h.Connected {
		conn = 1
	}
	ch <- prometheus.MustNewConstMetric(d[0], prometheus.GaugeValue, h.Lag.Seconds())
	ch <- prometheus.MustNewConstMetric(d[1], prometheus.GaugeValue, float64(h.DRM.Generation))
	ch <- prometheus.MustNewConstMetric(d[2], prometheus.GaugeValue, conn)
	ch <- prometheus.MustNewConstMetric(d[3], prometheus.CounterValue, float64(h.Frames))
}
