// Package collector owns the privilege split of arsd: a collector process
// that holds the eBPF telemetry and nothing else (CAP_BPF, CAP_PERFMON),
// and the engine-side Client that stands in for agent/telemetry in the
// control loop (agent.RunqSource, agent.VMTracker, the telemetry metrics,
// spike wake-ups).
//
// The engine starts the collector (arsd re-executed as `arsd collector`)
// with one end of a socketpair. On it the collector hands over a sealed
// memfd ring (ipc.ServeRingConn: SO_PEERCRED checked against the engine's
// PID) and then answers requests (track, untrack, read, metrics) as JSON
// frames; samples, spikes and the probe status travel on the ring as
// ipc envelopes. Either side dying is noticed (socket hang-up, pidfd, the
// child's exit status); the Client restarts the collector and replays
// what was tracked.
package collector

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/ars-dev/ars/agent/telemetry"
)

// request is one engine → collector call (JSON frame on the socket).
type request struct {
	ID   uint64           `json:"id"`
	Op   string           `json:"op"`
	TID  uint32           `json:"tid,omitempty"`
	VM   uint32           `json:"vm,omitempty"`
	VCPU uint32           `json:"vcpu,omitempty"`
	Ref  *telemetry.VMRef `json:"ref,omitempty"`
}

// reply answers a request.
type reply struct {
	ID    uint64 `json:"id"`
	Error string `json:"error,omitempty"`
	Data  []byte `json:"data,omitempty"` // metrics: protobuf-delimited metric families
}

const (
	opTrack     = "track"
	opUntrack   = "untrack"
	opTrackVM   = "track_vm"
	opUntrackVM = "untrack_vm"
	opRead      = "read"    // the samples frame goes on the ring before the reply
	opMetrics   = "metrics" // gathered telemetry metrics in the reply
)

// hello is the FrameHello payload: what loaded, with which privileges.
type hello struct {
	PID    int           `json:"pid"`
	UID    int           `json:"uid"`
	CapEff string        `json:"cap_eff"` // /proc/self/status CapEff after the drop
	Probes []probeStatus `json:"probes"`
}

type probeStatus struct {
	Name    string `json:"name"`
	Enabled bool   `json:"enabled"`
	Loaded  bool   `json:"loaded"`
	Err     string `json:"err,omitempty"`
}

func toWire(st []telemetry.ProbeStatus) []probeStatus {
	out := make([]probeStatus, 0, len(st))
	for _, s := range st {
		p := probeStatus{Name: s.Name, Enabled: s.Enabled, Loaded: s.Loaded}
		if s.Err != nil {
			p.Err = s.Err.Error()
		}
		out = append(out, p)
	}
	return out
}

func fromWire(st []probeStatus) []telemetry.ProbeStatus {
	out := make([]telemetry.ProbeStatus, 0, len(st))
	for _, s := range st {
		p := telemetry.ProbeStatus{Name: s.Name, Enabled: s.Enabled, Loaded: s.Loaded}
		if s.Err != "" {
			p.Err = errors.New(s.Err)
		}
		out = append(out, p)
	}
	return out
}

// Samples payload: u64 request id, u32 count, u32 0, then count entries of
// u32 tid, u32 0, u64 RunDelayNs, Count, OnCPUNs, Involuntary, Wakeups,
// Hist[HistSlots]; little-endian.
const sampleEntrySize = 8 + 8*(5+telemetry.HistSlots)

// maxSampleEntries bounds a decoded map (a hostile collector cannot make
// the engine allocate more than the frame holds anyway).
const maxSampleEntries = 1 << 16

func appendSamples(dst []byte, id uint64, m map[uint32]telemetry.VCPUStats) []byte {
	le := binary.LittleEndian
	dst = le.AppendUint64(dst, id)
	dst = le.AppendUint32(dst, uint32(len(m)))
	dst = le.AppendUint32(dst, 0)
	for tid, s := range m {
		dst = le.AppendUint32(dst, tid)
		dst = le.AppendUint32(dst, 0)
		for _, v := range [...]uint64{s.RunDelayNs, s.Count, s.OnCPUNs, s.Involuntary, s.Wakeups} {
			dst = le.AppendUint64(dst, v)
		}
		for _, v := range s.Hist {
			dst = le.AppendUint64(dst, v)
		}
	}
	return dst
}

func decodeSamples(b []byte) (uint64, map[uint32]telemetry.VCPUStats, error) {
	le := binary.LittleEndian
	if len(b) < 16 {
		return 0, nil, fmt.Errorf("samples frame of %d bytes", len(b))
	}
	id, n := le.Uint64(b), le.Uint32(b[8:])
	if n > maxSampleEntries || uint64(len(b)-16) != uint64(n)*sampleEntrySize {
		return 0, nil, fmt.Errorf("samples frame: %d entries in %d bytes", n, len(b))
	}
	m := make(map[uint32]telemetry.VCPUStats, n)
	p := b[16:]
	for i := uint32(0); i < n; i++ {
		e := p[:sampleEntrySize]
		p = p[sampleEntrySize:]
		u := func(k int) uint64 { return le.Uint64(e[8+8*k:]) }
		s := telemetry.VCPUStats{RunDelayNs: u(0), Count: u(1), OnCPUNs: u(2), Involuntary: u(3), Wakeups: u(4)}
		for j := range s.Hist {
			s.Hist[j] = u(5 + j)
		}
		m[le.Uint32(e)] = s
	}
	return id, m, nil
}

// Spike payload: i64 At, i64 Delay, u32 TID, VMSlot, VCPUSlot, u32 0.
const spikeSize = 32

func appendSpike(dst []byte, s telemetry.Spike) []byte {
	le := binary.LittleEndian
	dst = le.AppendUint64(dst, uint64(s.At))
	dst = le.AppendUint64(dst, uint64(s.Delay))
	dst = le.AppendUint32(dst, s.TID)
	dst = le.AppendUint32(dst, s.VMSlot)
	dst = le.AppendUint32(dst, s.VCPUSlot)
	return le.AppendUint32(dst, 0)
}

func decodeSpike(b []byte) (telemetry.Spike, error) {
	if len(b) != spikeSize {
		return telemetry.Spike{}, fmt.Errorf("spike frame of %d bytes, want %d", len(b), spikeSize)
	}
	le := binary.LittleEndian
	return telemetry.Spike{At: time.Duration(le.Uint64(b)), Delay: time.Duration(le.Uint64(b[8:])),
		TID: le.Uint32(b[16:]), VMSlot: le.Uint32(b[20:]), VCPUSlot: le.Uint32(b[24:])}, nil
}
