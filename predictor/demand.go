package predictor

import "math"

// Demand estimation. Usage is censored at the limit in force: a throttled
// VM never shows what it wanted. Each estimator below takes the usage of one
// tick plus the contention signals telemetry has for that resource and
// returns demand ≥ usage. Every signal is optional (zero = not measured),
// so an estimate degrades to plain usage, never below it.

// CPUObservation is what telemetry saw of one VM's CPU over one tick.
type CPUObservation struct {
	// UsageMillicores is the cgroup's measured CPU use over the tick.
	UsageMillicores float64
	// LimitMillicores is the quota in force during the tick (0 = unlimited).
	LimitMillicores float64
	// ThrottledPeriods and Periods are the CFS bandwidth counters' deltas.
	ThrottledPeriods, Periods uint64
	// RunqWaitMillicores is the vCPU threads' run-queue delay over the
	// tick (Σ wakeup→on-CPU ns of all vCPUs / tick length, in ms/s): time
	// the guest was runnable and did not run. 0 = not measured.
	RunqWaitMillicores float64
}

// ThrottleBoost is how far CPUDemand probes above a fully throttled usage.
const ThrottleBoost = 2.0

// CPUDemand estimates CPU demand from a usage that may be censored:
//
//	throttle = usage × (1 + (ThrottleBoost−1) × throttled/periods)   (limit set)
//	wait     = usage + run-queue wait
//	demand   = max(usage, throttle, wait)
//
// Throttling is evidence the VM wanted more than its quota, but not how
// much more: we probe upwards multiplicatively, like TCP slow start, scaled
// by the share of throttled periods, and the next forecast grows the quota
// until the VM stops being throttled. Run-queue delay is time the vCPUs were
// runnable but waited (for the quota or for a busy host CPU) — CPU the VM
// wanted and did not get, measured rather than guessed, so it adds as is.
func CPUDemand(o CPUObservation) float64 {
	u := math.Max(o.UsageMillicores, 0)
	d := u
	if o.Periods > 0 && o.ThrottledPeriods > 0 && o.LimitMillicores > 0 {
		share := math.Min(float64(o.ThrottledPeriods)/float64(o.Periods), 1)
		d = math.Max(d, u*(1+(ThrottleBoost-1)*share))
	}
	if w := o.RunqWaitMillicores; w > 0 && !math.IsInf(w, 0) {
		d = math.Max(d, u+w)
	}
	return d
}

// MemObservation is one tick of a VM's memory signals.
type MemObservation struct {
	// UsageBytes is the cgroup's (or guest's, via the balloon) used memory.
	UsageBytes float64
	// PSISome is the share of the tick some task stalled on memory (PSI
	// "some" avg10 / 100, in [0, 1]); 0 where PSI is absent.
	PSISome float64
	// MajorFaultsPerSec are major page faults (reads from swap or files
	// pushed out under pressure) per second; FaultBytes is what one costs
	// in memory (the page size, 4096 when 0).
	MajorFaultsPerSec, FaultBytes float64
	// ReclaimableBytes is memory the guest reports it could give back
	// (balloon stats: free + caches); it lowers demand.
	ReclaimableBytes float64
}

// MemDemand estimates memory demand:
//
//	demand = (usage − reclaimable) × (1 + PSI some) + major faults/s × page × 60
//
// The working set is usage minus what the guest could drop; PSI some is the
// share of time tasks stalled waiting for memory, so the working set is
// that much larger than what fits; each major fault per second is a page
// re-read because it did not fit, and a minute of them is the part of the
// working set that was evicted (memory is re-sized on a minute scale).
func MemDemand(o MemObservation) float64 {
	u := math.Max(o.UsageBytes, 0)
	ws := math.Max(u-math.Max(o.ReclaimableBytes, 0), 0)
	psi := math.Min(math.Max(o.PSISome, 0), 1)
	page := o.FaultBytes
	if page <= 0 {
		page = 4096
	}
	return ws*(1+psi) + math.Max(o.MajorFaultsPerSec, 0)*page*60
}

// IOObservation is one tick of a VM's block (or network) I/O.
type IOObservation struct {
	// Throughput is bytes (or operations) per second completed.
	Throughput float64
	// Limit is the throttle in force (0 = unlimited).
	Limit float64
	// QueueLatencySec is the mean time a request waited before issue
	// (throttle or device queue) and ServiceSec the mean time in service.
	QueueLatencySec, ServiceSec float64
}

// IODemand estimates I/O demand by Little's law: a request that waited q
// before a service of s would, unqueued, have completed in s, so the
// offered rate is throughput × (q + s) / s — but only when a limit is set
// and the queue is the throttle's (an unthrottled device queue is the
// device being slow, not the VM being capped):
//
//	demand = throughput × (1 + q/s)   if limit > 0 and s > 0
//	       = throughput               otherwise
func IODemand(o IOObservation) float64 {
	t := math.Max(o.Throughput, 0)
	if o.Limit > 0 && o.ServiceSec > 0 && o.QueueLatencySec > 0 {
		return t * (1 + o.QueueLatencySec/o.ServiceSec)
	}
	return t
}
