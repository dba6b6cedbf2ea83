package predictor

// CPUObservation is what telemetry saw of one VM's CPU over one tick.
type CPUObservation struct {
	// UsageMillicores is the cgroup's measured CPU use over the tick.
	UsageMillicores float64
	// LimitMillicores is the quota in force during the tick (0 = unlimited).
	LimitMillicores float64
	// ThrottledPeriods and Periods are the CFS bandwidth counters' deltas.
	ThrottledPeriods, Periods uint64
}

// CPUDemand estimates CPU demand from a usage that may be censored at the
// limit. Usage is censored when the cgroup was throttled during the tick:
// the VM wanted more than it got, and how much more is invisible. We then
// probe upwards multiplicatively, like TCP slow start, by ThrottleBoost×usage
// scaled by the share of throttled periods:
//
//	demand = usage × (1 + (ThrottleBoost−1) × throttled/periods)
//
// A VM throttled in every period reports ThrottleBoost × usage; one never
// throttled reports its usage. The next tick's forecast grows the quota, the
// VM uses it, and the estimate converges on the true demand in a few ticks.
func CPUDemand(o CPUObservation) float64 {
	const ThrottleBoost = 2.0
	d := o.UsageMillicores
	if d < 0 {
		d = 0
	}
	if o.Periods > 0 && o.ThrottledPeriods > 0 && o.LimitMillicores > 0 {
		share := float64(o.ThrottledPeriods) / float64(o.Periods)
		if share > 1 {
			share = 1
		}
		d *= 1 + (ThrottleBoost-1)*share
	}
	return d
}
