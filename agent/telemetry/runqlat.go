//go:build linux

package telemetry

import (
	"errors"
	"fmt"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// Runqlat is the loaded and attached run-queue delay program
// (bpf/runqlat.bpf.c). Track, Untrack, Read, Sample and Errors may be
// called concurrently (each is a few map syscalls); Close must come last.
// The agent must Untrack a thread when it exits: the kernel may reuse its
// tid for an unrelated thread.
type Runqlat struct {
	maps  runqlatMaps
	progs runqlatAttached
	vars  runqlatVars
	links []link.Link
	ncpu  int
}

// runqlatVars are the globals the agent sets at run time.
type runqlatVars struct {
	SpikeThresholdNs *ebpf.Variable `ebpf:"spike_threshold_ns"`
}

// runqlatAttached are the programs the agent attaches; the test programs in
// the same object are left unloaded.
type runqlatAttached struct {
	Switch    *ebpf.Program `ebpf:"runqlat_switch"`
	Wakeup    *ebpf.Program `ebpf:"runqlat_wakeup"`
	WakeupNew *ebpf.Program `ebpf:"runqlat_wakeup_new"`
}

func (p *runqlatAttached) Close() error {
	return errors.Join(closeProg(p.Switch), closeProg(p.Wakeup), closeProg(p.WakeupNew))
}

func closeProg(p *ebpf.Program) error {
	if p == nil {
		return nil
	}
	return p.Close()
}

// LoadRunqlat loads the run-queue delay program into the kernel and attaches
// it to tp_btf/sched_wakeup, sched_wakeup_new and sched_switch. It tracks
// nothing until Track is called. A verifier rejection is returned with the
// full verifier log.
func LoadRunqlat() (*Runqlat, error) { return LoadRunqlatPinned("") }

// LoadRunqlatPinned is LoadRunqlat with its maps and links pinned under
// pinRoot (see pin.go); "" pins nothing.
func LoadRunqlatPinned(pinRoot string) (*Runqlat, error) {
	dir, err := pinDir(pinRoot, ProbeSched, _RunqlatBytes)
	if err != nil {
		return nil, fmt.Errorf("runqlat: %w", err)
	}
	spec, err := loadRunqlat()
	if err != nil {
		return nil, fmt.Errorf("runqlat: parse embedded object: %w", err)
	}
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		return nil, fmt.Errorf("runqlat: possible CPUs: %w", err)
	}
	r := &Runqlat{ncpu: ncpu}
	var objs struct {
		runqlatMaps
		runqlatAttached
		runqlatVars
	}
	if err := spec.LoadAndAssign(&objs, pinOptions(spec, dir)); err != nil {
		return nil, fmt.Errorf("runqlat: load: %w", verifierDetail(err))
	}
	r.maps, r.progs, r.vars = objs.runqlatMaps, objs.runqlatAttached, objs.runqlatVars
	for _, p := range []struct {
		name string
		prog *ebpf.Program
	}{
		{"sched_switch", r.progs.Switch},
		{"sched_wakeup", r.progs.Wakeup},
		{"sched_wakeup_new", r.progs.WakeupNew},
	} {
		l, err := attach(dir, p.name, p.prog)
		if err != nil {
			return nil, errors.Join(fmt.Errorf("runqlat: attach tp_btf/%s: %w", p.name, err), r.Close())
		}
		r.links = append(r.links, l)
	}
	return r, nil
}

// verifierDetail expands a verifier error to its full log (%+v); other
// errors pass through.
func verifierDetail(err error) error {
	var ve *ebpf.VerifierError
	if errors.As(err, &ve) {
		return fmt.Errorf("%w\n%+v", err, ve)
	}
	return err
}

// Track starts accounting for thread tid, labelled with the agent's VM and
// vCPU slots. Tracking a thread that is already tracked updates its labels
// and keeps its counters. The first delay is counted from the thread's next
// wakeup or preemption.
func (r *Runqlat) Track(tid, vmSlot, vcpuSlot uint32) error {
	if tid == 0 {
		return errors.New("runqlat: track: tid 0 is the idle task")
	}
	// Kernel-updated entries first, so a tracked tid always has them (the
	// programs never create entries; they only update them in place).
	zero := make([]runqlatVcpuStats, r.ncpu)
	if err := r.maps.Stats.Update(tid, zero, ebpf.UpdateNoExist); err != nil && !errors.Is(err, ebpf.ErrKeyExist) {
		return fmt.Errorf("runqlat: track %d: create stats: %w", tid, err)
	}
	if err := r.maps.State.Update(tid, runqlatThreadState{}, ebpf.UpdateNoExist); err != nil && !errors.Is(err, ebpf.ErrKeyExist) {
		return fmt.Errorf("runqlat: track %d: create state: %w", tid, err)
	}
	v := runqlatTrackedVcpu{VmSlot: vmSlot, VcpuSlot: vcpuSlot}
	if err := r.maps.Tracked.Update(tid, v, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("runqlat: track %d: %w", tid, err)
	}
	return nil
}

// Untrack stops accounting for tid and drops its counters. Untracking a
// thread that is not tracked is not an error.
func (r *Runqlat) Untrack(tid uint32) error {
	var errs []error
	for _, m := range []struct {
		name string
		m    *ebpf.Map
	}{{"tracked", r.maps.Tracked}, {"state", r.maps.State}, {"stats", r.maps.Stats}} {
		if err := m.m.Delete(tid); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, fmt.Errorf("runqlat: untrack %d: delete from %s: %w", tid, m.name, err))
		}
	}
	return errors.Join(errs...)
}

// Read returns the counters of every tracked thread, summed over CPUs.
// Counters only grow while a thread stays tracked; use VCPUStats.Sub for
// the change over a tick. OnCPUNs includes the slice in progress; a wait in
// progress is counted when it ends, as the kernel's schedstat does.
func (r *Runqlat) Read() (map[uint32]VCPUStats, error) {
	out, err := r.readStats()
	if err != nil {
		return nil, err
	}
	return r.addSliceInProgress(out)
}

// readStats is the stats map summed over CPUs: on-CPU time up to each
// thread's last switch-out.
func (r *Runqlat) readStats() (map[uint32]VCPUStats, error) {
	out := make(map[uint32]VCPUStats)
	var (
		tid    uint32
		percpu []runqlatVcpuStats
	)
	it := r.maps.Stats.Iterate()
	for it.Next(&tid, &percpu) {
		var s VCPUStats
		for _, c := range percpu {
			s = s.Add(fromKernel(c))
		}
		out[tid] = s
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("runqlat: read stats: %w", err)
	}
	return out, nil
}

func (r *Runqlat) addSliceInProgress(out map[uint32]VCPUStats) (map[uint32]VCPUStats, error) {
	var tid uint32
	// A thread's on-CPU time reaches stats at switch-out; add the slice in
	// progress so a thread that holds a CPU for the whole tick is not
	// reported idle. Read after stats: a switch-out in between then moves
	// the slice to the next Read instead of counting it twice.
	var st runqlatThreadState
	sit := r.maps.State.Iterate()
	for sit.Next(&tid, &st) {
		s, ok := out[tid]
		if !ok || st.OncpuSinceNs == 0 {
			continue
		}
		var now unix.Timespec
		if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &now); err != nil { // bpf_ktime_get_ns's clock
			return nil, fmt.Errorf("runqlat: read clock: %w", err)
		}
		if n := uint64(now.Nano()); n > st.OncpuSinceNs {
			s.OnCPUNs += n - st.OncpuSinceNs
			out[tid] = s
		}
	}
	if err := sit.Err(); err != nil {
		return nil, fmt.Errorf("runqlat: read state: %w", err)
	}
	return out, nil
}

func fromKernel(c runqlatVcpuStats) VCPUStats {
	return VCPUStats{
		RunDelayNs:  c.RunDelayNs,
		Count:       c.Count,
		OnCPUNs:     c.OncpuNs,
		Involuntary: c.Involuntary,
		Wakeups:     c.Wakeups,
		Hist:        c.Hist, // a length drift between C and Go fails to compile
	}
}

// Errors returns the in-kernel failure counters, summed over CPUs.
func (r *Runqlat) Errors() (RunqlatErrors, error) {
	var e RunqlatErrors
	for kind, dst := range map[uint32]*uint64{
		errNoState: &e.NoState,
		errNoStats: &e.NoStats,
		errClock:   &e.Clock,
		errRingbuf: &e.Ringbuf,
	} {
		var percpu []uint64
		if err := r.maps.Errors.Lookup(kind, &percpu); err != nil {
			return RunqlatErrors{}, fmt.Errorf("runqlat: read error counter %d: %w", kind, err)
		}
		for _, n := range percpu {
			*dst += n
		}
	}
	return e, nil
}

// Close detaches the programs and frees their maps.
func (r *Runqlat) Close() error {
	var errs []error
	for _, l := range r.links {
		errs = append(errs, l.Close())
	}
	r.links = nil
	errs = append(errs, r.progs.Close(), r.maps.Close())
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("runqlat: close: %w", err)
	}
	return nil
}

// Sample reads the eBPF counters of all tracked threads and the kernel's
// accounting (under procRoot, usually /proc) of tids, for CrossCheck.
func (r *Runqlat) Sample(procRoot string, tids []uint32) (Sample, error) {
	s := Sample{Kernel: make(map[uint32]KernelSample, len(tids))}
	var err error
	if s.BPF, err = r.Read(); err != nil {
		return Sample{}, err
	}
	for _, tid := range tids {
		k, err := ReadKernelSample(procRoot, int(tid))
		if err != nil {
			return Sample{}, fmt.Errorf("runqlat: sample tid %d: %w", tid, err)
		}
		s.Kernel[tid] = k
	}
	return s, nil
}

// Programs returns the attached programs by attach point, for run-time
// statistics (ebpf.EnableStats, Program.Stats).
func (r *Runqlat) Programs() map[string]*ebpf.Program {
	return map[string]*ebpf.Program{
		"sched_switch":     r.progs.Switch,
		"sched_wakeup":     r.progs.Wakeup,
		"sched_wakeup_new": r.progs.WakeupNew,
	}
}

// SetSpikeThreshold makes every run-queue delay of a tracked thread at or
// above d a Spike event (see Spikes); 0 turns spike events off (the
// default). It takes effect immediately, without reloading.
func (r *Runqlat) SetSpikeThreshold(d time.Duration) error {
	if d < 0 {
		return fmt.Errorf("runqlat: negative spike threshold %v", d)
	}
	if err := r.vars.SpikeThresholdNs.Set(uint64(d.Nanoseconds())); err != nil {
		return fmt.Errorf("runqlat: set spike threshold: %w", err)
	}
	return nil
}
