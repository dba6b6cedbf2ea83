package telemetry

import (
	"errors"
	"fmt"
	"math"
	"sort"
)

// Sample pairs the eBPF counters and the kernel's own accounting of a set
// of threads, read at nearly one moment (Runqlat.Sample).
type Sample struct {
	BPF    map[uint32]VCPUStats
	Kernel map[uint32]KernelSample
}

// Tolerance bounds a disagreement over a window with events scheduler
// events (switch-ins):
//
//	|bpf - kernel| <= max(Rel*kernel, Abs + PerEvent*events)
//
// PerEvent covers errors that are systematic per event, such as the two
// sides stamping a switch at different points of __schedule.
type Tolerance struct {
	Rel      float64
	Abs      uint64
	PerEvent uint64
}

// Allows reports whether bpf is within the tolerance of kernel.
func (t Tolerance) Allows(bpf, kernel, events uint64) bool {
	diff := math.Abs(float64(bpf) - float64(kernel))
	return diff <= math.Max(t.Rel*float64(kernel), float64(t.Abs)+float64(t.PerEvent)*float64(events))
}

func (t Tolerance) String() string {
	return fmt.Sprintf("max(%g%%, %d + %d/event)", t.Rel*100, t.Abs, t.PerEvent)
}

// CrossCheckTolerance says how far each eBPF counter may stray from the
// kernel's accounting over one window.
type CrossCheckTolerance struct {
	RunDelay    Tolerance // RunDelayNs vs schedstat run_delay (ns)
	Count       Tolerance // Count vs schedstat timeslices
	OnCPU       Tolerance // OnCPUNs vs schedstat on-CPU time (ns)
	Involuntary Tolerance // Involuntary vs status nonvoluntary_ctxt_switches
}

// DefaultCrossCheckTolerance holds with a margin of two or more over what
// TestRunqlatMatchesSchedstat measured on a 2-CPU host (threads pinned to
// one CPU, 3 s windows, idle and beside stress-ng --cpu 2): run delay
// within 1.6%, on-CPU within 4.7%, count vs timeslices within 8 of ~3300,
// involuntary switches exact. The time error is systematic, about 4-5 µs
// per switch-in on that host and of opposite sign for run delay and
// on-CPU: schedstat stamps a switch with the rq clock updated early in
// __schedule, the program at the sched_switch tracepoint later on (the
// kernel's on-CPU time also excludes IRQ and steal time). Threads with
// many short slices therefore show the largest relative error, hence
// PerEvent. The absolute floors cover a wait or slice in flight at a
// window edge (schedstat's on-CPU time of a running thread lags by up to
// a tick).
func DefaultCrossCheckTolerance() CrossCheckTolerance {
	return CrossCheckTolerance{
		RunDelay:    Tolerance{Rel: 0.05, Abs: 2_000_000, PerEvent: 10_000},
		Count:       Tolerance{Rel: 0.01, Abs: 10},
		OnCPU:       Tolerance{Rel: 0.05, Abs: 4_000_000, PerEvent: 10_000},
		Involuntary: Tolerance{Rel: 0.005, Abs: 2},
	}
}

// Agreement is one thread's change over a window, as counted by the eBPF
// program and by the kernel.
type Agreement struct {
	TID    uint32
	BPF    VCPUStats
	Kernel KernelSample
}

func (a Agreement) String() string {
	return fmt.Sprintf("tid %d: run_delay bpf %d kernel %d ns; count %d timeslices %d; "+
		"oncpu bpf %d kernel %d ns; involuntary bpf %d kernel %d; wakeups %d",
		a.TID, a.BPF.RunDelayNs, a.Kernel.RunDelayNs, a.BPF.Count, a.Kernel.Timeslices,
		a.BPF.OnCPUNs, a.Kernel.OnCPUNs, a.BPF.Involuntary, a.Kernel.Nonvoluntary, a.BPF.Wakeups)
}

// RelErr is |bpf-kernel|/kernel, or 0 if both are 0 and +Inf if only
// kernel is 0.
func RelErr(bpf, kernel uint64) float64 {
	if kernel == 0 {
		if bpf == 0 {
			return 0
		}
		return math.Inf(1)
	}
	return math.Abs(float64(bpf)-float64(kernel)) / float64(kernel)
}

// CrossCheck compares, for every tid, the change of the eBPF counters
// between before and after with the change of the kernel's accounting, and
// returns the per-thread deltas (sorted by tid) and an error naming every
// counter outside tol. A tid missing from either sample is an error.
// Threads must stay tracked for the whole window, and before should be
// taken once each thread has been switched in since Track (a slice already
// running at Track is not counted as on-CPU time).
func CrossCheck(before, after Sample, tids []uint32, tol CrossCheckTolerance) ([]Agreement, error) {
	var (
		out  []Agreement
		errs []error
	)
	sorted := append([]uint32(nil), tids...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i] < sorted[j] })
	for _, tid := range sorted {
		b0, ok0 := before.BPF[tid]
		b1, ok1 := after.BPF[tid]
		k0, ok2 := before.Kernel[tid]
		k1, ok3 := after.Kernel[tid]
		if !ok0 || !ok1 || !ok2 || !ok3 {
			errs = append(errs, fmt.Errorf("tid %d: missing from a sample (bpf %t/%t, kernel %t/%t)", tid, ok0, ok1, ok2, ok3))
			continue
		}
		a := Agreement{
			TID: tid,
			BPF: b1.Sub(b0),
			Kernel: KernelSample{
				OnCPUNs:      k1.OnCPUNs - k0.OnCPUNs,
				RunDelayNs:   k1.RunDelayNs - k0.RunDelayNs,
				Timeslices:   k1.Timeslices - k0.Timeslices,
				Nonvoluntary: k1.Nonvoluntary - k0.Nonvoluntary,
			},
		}
		out = append(out, a)
		for _, c := range []struct {
			name        string
			bpf, kernel uint64
			tol         Tolerance
		}{
			{"run delay ns", a.BPF.RunDelayNs, a.Kernel.RunDelayNs, tol.RunDelay},
			{"count vs timeslices", a.BPF.Count, a.Kernel.Timeslices, tol.Count},
			{"on-CPU ns", a.BPF.OnCPUNs, a.Kernel.OnCPUNs, tol.OnCPU},
			{"involuntary switches", a.BPF.Involuntary, a.Kernel.Nonvoluntary, tol.Involuntary},
		} {
			if !c.tol.Allows(c.bpf, c.kernel, a.Kernel.Timeslices) {
				errs = append(errs, fmt.Errorf("tid %d: %s: bpf %d, kernel %d, error %.2f%% outside %s",
					tid, c.name, c.bpf, c.kernel, 100*RelErr(c.bpf, c.kernel), c.tol))
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return out, fmt.Errorf("cross-check against kernel accounting: %w", err)
	}
	return out, nil
}
