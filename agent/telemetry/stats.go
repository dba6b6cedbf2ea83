package telemetry

import "math"

// HistSlots is the number of log2 buckets of a delay histogram (HIST_SLOTS
// in bpf/hist.h). Slot 0 holds delays in [0, 2) ns, slot i (0 < i <
// HistSlots-1) holds [2^i, 2^(i+1)) ns, and the last slot everything from
// 2^(HistSlots-1) ns (about 2.1 s) up.
const HistSlots = 32

// VCPUStats are one thread's run-queue counters, summed over CPUs.
type VCPUStats struct {
	RunDelayNs  uint64 // total time spent runnable but waiting for a CPU
	Count       uint64 // number of waits in RunDelayNs and Hist
	OnCPUNs     uint64 // total time on a CPU (counted at switch-out)
	Involuntary uint64 // switch-outs while still runnable (preemptions)
	Wakeups     uint64 // wakeups of the thread
	Hist        [HistSlots]uint64
}

// Add returns the element-wise sum of s and o.
func (s VCPUStats) Add(o VCPUStats) VCPUStats {
	s.RunDelayNs += o.RunDelayNs
	s.Count += o.Count
	s.OnCPUNs += o.OnCPUNs
	s.Involuntary += o.Involuntary
	s.Wakeups += o.Wakeups
	for i := range s.Hist {
		s.Hist[i] += o.Hist[i]
	}
	return s
}

// Sub returns s - prev, the change between two reads of the same tracked
// thread. Counters that went backwards (the thread was untracked and
// tracked again in between) yield s's own value for that counter.
func (s VCPUStats) Sub(prev VCPUStats) VCPUStats {
	d := func(a, b uint64) uint64 {
		if a < b {
			return a
		}
		return a - b
	}
	s.RunDelayNs = d(s.RunDelayNs, prev.RunDelayNs)
	s.Count = d(s.Count, prev.Count)
	s.OnCPUNs = d(s.OnCPUNs, prev.OnCPUNs)
	s.Involuntary = d(s.Involuntary, prev.Involuntary)
	s.Wakeups = d(s.Wakeups, prev.Wakeups)
	for i := range s.Hist {
		s.Hist[i] = d(s.Hist[i], prev.Hist[i])
	}
	return s
}

// SlotBounds returns the delay range [lo, hi) in ns of histogram slot i.
// The last slot has no upper bound; hi is reported as +Inf.
func SlotBounds(i int) (lo, hi float64) {
	switch {
	case i <= 0:
		return 0, 2
	case i >= HistSlots-1:
		return math.Ldexp(1, HistSlots-1), math.Inf(1)
	default:
		return math.Ldexp(1, i), math.Ldexp(1, i+1)
	}
}

// Quantile estimates the q-quantile (0 <= q <= 1) of the run-queue delay
// in ns from the histogram, interpolating linearly inside the bucket that
// holds it. It returns 0 when the histogram is empty. An estimate that
// falls into the open-ended last bucket is that bucket's lower bound, so a
// quantile is never overstated. The true value lies within a factor of 2
// of the estimate (the bucket width).
func (s VCPUStats) Quantile(q float64) float64 {
	var total uint64
	for _, n := range s.Hist {
		total += n
	}
	if total == 0 || math.IsNaN(q) {
		return 0
	}
	q = math.Min(math.Max(q, 0), 1)
	rank := q * float64(total)
	var cum float64
	for i, n := range s.Hist {
		if n == 0 {
			continue
		}
		if cum+float64(n) >= rank {
			lo, hi := SlotBounds(i)
			if math.IsInf(hi, 1) {
				return lo
			}
			return lo + (hi-lo)*(rank-cum)/float64(n)
		}
		cum += float64(n)
	}
	return 0 // unreachable: rank <= total
}

// MeanDelayNs is RunDelayNs/Count, 0 without samples.
func (s VCPUStats) MeanDelayNs() float64 {
	if s.Count == 0 {
		return 0
	}
	return float64(s.RunDelayNs) / float64(s.Count)
}

// RunqlatErrors count in-kernel failures of the runqlat program; all should
// stay 0. A non-zero value means events were dropped, not that numbers are
// wrong.
type RunqlatErrors struct {
	NoState uint64 // event for a tracked tid whose state entry is missing (Track/Untrack race)
	NoStats uint64 // event for a tracked tid whose stats entry is missing (Track/Untrack race)
	Clock   uint64 // switch-in timestamp earlier than the wait start (sample dropped)
	Ringbuf uint64 // spike event dropped: the spikes ring buffer was full
}

// Indexes of the errors map (enum runqlat_err in bpf/runqlat.bpf.c).
const (
	errNoState = 0
	errNoStats = 1
	errClock   = 2
	errRingbuf = 3
	errKinds   = 4
)
