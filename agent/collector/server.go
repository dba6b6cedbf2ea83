package collector

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"

	"github.com/ars-dev/ars/agent/telemetry"
	"github.com/ars-dev/ars/ipc"
)

// Backend is the telemetry the collector process serves
// (*telemetry.Telemetry in arsd; a fake in tests).
type Backend interface {
	Track(tid, vmSlot, vcpuSlot uint32) error
	Untrack(tid uint32) error
	Read() (map[uint32]telemetry.VCPUStats, error)
	TrackVM(vmSlot uint32, vm telemetry.VMRef) error
	UntrackVM(vmSlot uint32) error
}

// SpikeSource delivers run-queue delay spikes until closed
// (*telemetry.SpikeReader).
type SpikeSource interface {
	Read() (telemetry.Spike, error)
	Close() error
}

// ServerConfig is what the collector process serves.
type ServerConfig struct {
	Backend Backend
	Spikes  SpikeSource          // nil: no spike events
	Metrics prometheus.Collector // nil: no telemetry metrics
	Probes  []telemetry.ProbeStatus
	// Ring is the samples ring's size (default 4 MiB; a read of N vCPUs
	// is 16 + 304·N bytes).
	RingCapacity int
	Log          *slog.Logger
}

// RingCapacityDefault is the default size of the collector's ring.
const RingCapacityDefault = 4 << 20

// EngineIs authorizes exactly the process pid (the collector's parent)
// as the engine end of the handshake.
func EngineIs(pid int) ipc.Authorizer {
	return func(p ipc.Peer, _ string) error {
		if int(p.PID) != pid {
			return fmt.Errorf("peer pid %d is not the engine (pid %d)", p.PID, pid)
		}
		return nil
	}
}

// Serve runs the collector end on conn until the engine hangs up (nil) or
// ctx ends: it hands the ring over (auth checks the engine), announces
// the probes, streams spikes, and answers requests.
func Serve(ctx context.Context, conn *net.UnixConn, auth ipc.Authorizer, cfg ServerConfig) error {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.RingCapacity == 0 {
		cfg.RingCapacity = RingCapacityDefault
	}
	peer, p, err := ipc.ServeRingConn(conn, auth, ipc.RingConfig{Capacity: cfg.RingCapacity, Batch: 1})
	if err != nil {
		return fmt.Errorf("collector: handshake with engine: %w", err)
	}
	s := &server{cfg: cfg, p: p}
	defer func() {
		s.mu.Lock()
		p.Close()
		s.mu.Unlock()
	}()
	h, _ := json.Marshal(hello{PID: os.Getpid(), UID: os.Getuid(), CapEff: capEff(), Probes: toWire(cfg.Probes)})
	if err := s.write(ipc.FrameHello, h, true); err != nil {
		return fmt.Errorf("collector: hello: %w", err)
	}
	cfg.Log.Info("collector serving the engine", "engine_pid", peer.PID, "cap_eff", capEff())

	var wg sync.WaitGroup
	defer wg.Wait()
	if cfg.Spikes != nil {
		defer cfg.Spikes.Close()
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.forwardSpikes()
		}()
	}
	stop := context.AfterFunc(ctx, func() { conn.SetReadDeadline(time.Now()) })
	defer stop()
	for {
		b, err := ipc.ReadFrame(conn)
		if err != nil {
			if errors.Is(err, io.EOF) {
				cfg.Log.Info("collector: the engine hung up (exited or died)")
				return nil
			}
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("collector: read request: %w", err)
		}
		var req request
		var rep reply
		if err := json.Unmarshal(b, &req); err != nil {
			rep.Error = "malformed request: " + err.Error()
		} else {
			rep = s.handle(req)
		}
		out, _ := json.Marshal(rep)
		conn.SetWriteDeadline(time.Now().Add(10 * time.Second))
		if err := ipc.WriteFrame(conn, out); err != nil {
			return fmt.Errorf("collector: reply: %w", err)
		}
	}
}

type server struct {
	cfg ServerConfig
	mu  sync.Mutex // the ring has one producer: serializes writers
	p   *ipc.Producer
	seq uint64
	buf []byte
}

// write sends one envelope on the ring; block=false drops it when full.
func (s *server) write(t ipc.FrameType, payload []byte, block bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.seq++
	s.buf = ipc.AppendEnvelope(s.buf[:0], ipc.Envelope{Type: t, Generation: uint64(os.Getpid()), Seq: s.seq, Payload: payload})
	if block {
		return s.p.WriteFrame(s.buf)
	}
	return s.p.TryWriteFrame(s.buf)
}

func (s *server) handle(req request) reply {
	rep := reply{ID: req.ID}
	var err error
	b := s.cfg.Backend
	switch req.Op {
	case opTrack:
		err = b.Track(req.TID, req.VM, req.VCPU)
	case opUntrack:
		err = b.Untrack(req.TID)
	case opTrackVM:
		if req.Ref == nil {
			err = errors.New("track_vm without a VM")
		} else {
			err = b.TrackVM(req.VM, *req.Ref)
		}
	case opUntrackVM:
		err = b.UntrackVM(req.VM)
	case opRead:
		var m map[uint32]telemetry.VCPUStats
		if m, err = b.Read(); err == nil {
			err = s.write(ipc.FrameSamples, appendSamples(nil, req.ID, m), true)
		}
	case opMetrics:
		if s.cfg.Metrics == nil {
			break
		}
		reg := prometheus.NewRegistry()
		if err = reg.Register(s.cfg.Metrics); err != nil {
			break
		}
		var mfs []*dto.MetricFamily
		if mfs, err = reg.Gather(); err != nil && len(mfs) == 0 {
			break
		}
		var buf bytes.Buffer
		enc := expfmt.NewEncoder(&buf, expfmt.NewFormat(expfmt.TypeProtoDelim))
		for _, mf := range mfs {
			if e := enc.Encode(mf); e != nil {
				err = e
				break
			}
		}
		rep.Data = buf.Bytes()
	default:
		err = fmt.Errorf("unknown op %q", req.Op)
	}
	if err != nil {
		rep.Error = err.Error()
	}
	return rep
}

func (s *server) forwardSpikes() {
	for {
		sp, err := s.cfg.Spikes.Read()
		if err != nil {
			if !errors.Is(err, telemetry.ErrClosed) {
				s.cfg.Log.Warn("collector: spike reader stopped", "err", err)
			}
			return
		}
		// A spike only wakes the loop early: dropped when the ring is full.
		if err := s.write(ipc.FrameSpike, appendSpike(nil, sp), false); err != nil &&
			!errors.Is(err, ipc.ErrWouldBlock) {
			return
		}
	}
}

// capEff is the calling thread's effective capability mask, as the kernel
// reports it (for the log and the hello).
func capEff() string {
	b, err := os.ReadFile("/proc/thread-self/status")
	if err != nil {
		return "?"
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "CapEff:"); ok {
			return strings.TrimSpace(v)
		}
	}
	return "?"
}
