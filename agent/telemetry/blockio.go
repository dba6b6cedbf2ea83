//go:build linux

package telemetry

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// Directions of IOStats' arrays.
const (
	IORead  = 0
	IOWrite = 1
	IOOther = 2 // flush, discard, write-zeroes, ...
	IODirs  = 3
)

// IOStats are a process's block requests since it was tracked, by
// direction: completed requests, bytes, summed issue-to-completion latency
// and its log2 histogram in ns (slots as VCPUStats.Hist).
type IOStats struct {
	Requests  [IODirs]uint64
	Bytes     [IODirs]uint64
	LatencyNs [IODirs]uint64
	Hist      [IODirs][HistSlots]uint64
}

// Add is the sum of two counters.
func (s IOStats) Add(o IOStats) IOStats {
	for d := range IODirs {
		s.Requests[d] += o.Requests[d]
		s.Bytes[d] += o.Bytes[d]
		s.LatencyNs[d] += o.LatencyNs[d]
		for i := range HistSlots {
			s.Hist[d][i] += o.Hist[d][i]
		}
	}
	return s
}

// Sub is the change since prev (saturating at 0).
func (s IOStats) Sub(prev IOStats) IOStats {
	for d := range IODirs {
		s.Requests[d] = sat(s.Requests[d], prev.Requests[d])
		s.Bytes[d] = sat(s.Bytes[d], prev.Bytes[d])
		s.LatencyNs[d] = sat(s.LatencyNs[d], prev.LatencyNs[d])
		for i := range HistSlots {
			s.Hist[d][i] = sat(s.Hist[d][i], prev.Hist[d][i])
		}
	}
	return s
}

// BlockIOErrors count in-kernel failures of the block I/O program.
type BlockIOErrors struct {
	InflightFull uint64 // a tracked request not followed: inflight map full
	NoStats      uint64 // a tracked process's stats entry missing (Track/Untrack race)
	NotIssued    uint64 // completed without its issue seen (counted, no latency)
}

// BlockIO is the loaded and attached block I/O program
// (bpf/blockio.bpf.c). Methods may be called concurrently; Close last.
type BlockIO struct {
	maps  blockioMaps
	progs blockioPrograms
	links []link.Link
	ncpu  int
}

// LoadBlockIO loads the block I/O program and attaches it to
// tp_btf/block_io_start, block_rq_issue and block_rq_complete.
func LoadBlockIO() (*BlockIO, error) { return LoadBlockIOPinned("") }

// LoadBlockIOPinned is LoadBlockIO with its maps and links pinned under
// pinRoot (see pin.go); "" pins nothing.
func LoadBlockIOPinned(pinRoot string) (*BlockIO, error) {
	dir, err := pinDir(pinRoot, ProbeBlockIO, _BlockioBytes)
	if err != nil {
		return nil, fmt.Errorf("blockio: %w", err)
	}
	spec, err := loadBlockio()
	if err != nil {
		return nil, fmt.Errorf("blockio: parse embedded object: %w", err)
	}
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		return nil, fmt.Errorf("blockio: possible CPUs: %w", err)
	}
	var objs blockioObjects
	if err := spec.LoadAndAssign(&objs, pinOptions(spec, dir)); err != nil {
		return nil, fmt.Errorf("blockio: load: %w", verifierDetail(err))
	}
	b := &BlockIO{maps: objs.blockioMaps, progs: objs.blockioPrograms, ncpu: ncpu}
	for name, p := range b.Programs() {
		l, err := attach(dir, name, p)
		if err != nil {
			return nil, errors.Join(fmt.Errorf("blockio: attach tp_btf/%s: %w", name, err), b.Close())
		}
		b.links = append(b.links, l)
	}
	return b, nil
}

// TrackProcess attributes the block requests that process tgid's threads
// submit to VM slot vmSlot. Tracking again keeps the counters.
func (b *BlockIO) TrackProcess(tgid, vmSlot uint32) error {
	zero := make([]blockioIoStats, b.ncpu)
	if err := b.maps.Io.Update(tgid, zero, ebpf.UpdateNoExist); err != nil && !errors.Is(err, ebpf.ErrKeyExist) {
		return fmt.Errorf("blockio: track %d: %w", tgid, err)
	}
	if err := b.maps.Procs.Update(tgid, vmSlot, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("blockio: track %d: %w", tgid, err)
	}
	return nil
}

// UntrackProcess stops attributing tgid's requests and drops its counters.
func (b *BlockIO) UntrackProcess(tgid uint32) error {
	return deleteKeys("blockio", tgid, b.maps.Procs, b.maps.Io)
}

// Read returns the counters of every tracked process, summed over CPUs.
func (b *BlockIO) Read() (map[uint32]IOStats, error) {
	out := make(map[uint32]IOStats)
	var (
		tgid   uint32
		percpu []blockioIoStats
	)
	it := b.maps.Io.Iterate()
	for it.Next(&tgid, &percpu) {
		var s IOStats
		for _, c := range percpu {
			s = s.Add(IOStats{Requests: c.Requests, Bytes: c.Bytes, LatencyNs: c.LatencyNs, Hist: c.Hist})
		}
		out[tgid] = s
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("blockio: read: %w", err)
	}
	return out, nil
}

// Errors returns the in-kernel failure counters, summed over CPUs.
func (b *BlockIO) Errors() (BlockIOErrors, error) {
	var e BlockIOErrors
	for kind, dst := range []*uint64{&e.InflightFull, &e.NoStats, &e.NotIssued} {
		n, err := sumPerCPU(b.maps.Errors, uint32(kind))
		if err != nil {
			return BlockIOErrors{}, fmt.Errorf("blockio: %w", err)
		}
		*dst = n
	}
	return e, nil
}

// Programs returns the attached programs by attach point.
func (b *BlockIO) Programs() map[string]*ebpf.Program {
	return map[string]*ebpf.Program{
		"block_io_start":    b.progs.BlockioStart,
		"block_rq_issue":    b.progs.BlockioIssue,
		"block_rq_complete": b.progs.BlockioComplete,
	}
}

// Close detaches the programs and frees their maps.
func (b *BlockIO) Close() error {
	var errs []error
	for _, l := range b.links {
		errs = append(errs, l.Close())
	}
	b.links = nil
	errs = append(errs, b.progs.Close(), b.maps.Close())
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("blockio: close: %w", err)
	}
	return nil
}
