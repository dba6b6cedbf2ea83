package predictor

import (
	"fmt"
	"math"
	"sort"
)

// Hindsight references for the goal table. A causal model decides each
// step's allocation from the past only; these references see the whole
// series first and then give every series one constant allocation. They are
// not baselines to beat step by step — on a series whose level moves, a
// forecaster beats a constant easily — but on series that are noise around
// a fixed level (most PlanetLab VMs: lag-1 autocorrelation ≈ 0) a constant
// chosen with hindsight is as good as any forecast can be, so they bound
// how low a slack any model can reach there, and so how far the goal's
// slack ratio is reachable on a given trace at all.

// Oracle is one hindsight reference: its totals over all series and each
// series' violation rate.
type Oracle struct {
	Name          string
	ViolationRate float64
	Slack         float64
	PerSeries     []float64
}

// constCurve lists, for one series' scored samples (V[1:]), every constant
// allocation worth considering — each distinct sample value, and 0 — with
// the violations and slack it would have had, ordered by allocation.
type constCurve struct {
	alloc []float64
	viol  []int
	slack []float64
	n     int
	usage float64
}

func newConstCurve(v []float64) constCurve {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	n := len(s)
	c := constCurve{n: n}
	pre := 0.0 // Σ s[0..j]
	c.alloc = append(c.alloc, 0)
	below := 0 // samples equal to 0 cost no violation at allocation 0
	for below < n && s[below] <= 0 {
		below++
	}
	c.viol = append(c.viol, n-below)
	c.slack = append(c.slack, 0)
	for j := 0; j < n; j++ {
		pre += s[j]
		if j+1 < n && s[j+1] == s[j] {
			continue // the last of a run of equal values stands for it
		}
		if s[j] <= 0 {
			continue // allocation 0 is already listed
		}
		c.alloc = append(c.alloc, s[j])
		c.viol = append(c.viol, n-1-j)
		c.slack = append(c.slack, s[j]*float64(j+1)-pre)
	}
	c.usage = pre
	return c
}

// withAtMost returns the index of the cheapest constant with at most v
// violations (the curve's slack falls as violations rise).
func (c *constCurve) withAtMost(v int) int {
	for i := range c.viol {
		if c.viol[i] <= v {
			return i
		}
	}
	return len(c.viol) - 1
}

// pick returns the index minimising slack + λ·violations among constants
// with at most maxViol violations (ties: fewer violations).
func (c *constCurve) pick(lambda float64, maxViol int) int {
	best, cost := -1, math.Inf(1)
	for i := len(c.viol) - 1; i >= 0; i-- { // fewest violations first
		if c.viol[i] > maxViol {
			continue
		}
		if x := c.slack[i] + lambda*float64(c.viol[i]); x < cost {
			best, cost = i, x
		}
	}
	if best < 0 {
		best = len(c.viol) - 1
	}
	return best
}

func (res *BacktestResult) curves() []constCurve {
	out := make([]constCurve, len(res.Runs))
	for i, run := range res.Runs {
		if len(run.Series.V) > 1 {
			out[i] = newConstCurve(run.Series.V[1:])
		}
	}
	return out
}

func oracleTotals(name string, cs []constCurve, choice []int) Oracle {
	o := Oracle{Name: name}
	var viol, steps int
	var slack, usage float64
	for i, c := range cs {
		if c.n == 0 {
			continue
		}
		j := choice[i]
		viol += c.viol[j]
		steps += c.n
		slack += c.slack[j]
		usage += c.usage
		o.PerSeries = append(o.PerSeries, float64(c.viol[j])/float64(c.n))
	}
	if steps > 0 {
		o.ViolationRate = float64(viol) / float64(steps)
	}
	if usage > 0 {
		o.Slack = slack / usage
	}
	return o
}

// OracleSameViolations gives every series the cheapest constant allocation
// that violates no more often than model m did on that series: the slack
// a perfect forecaster of a stationary series would leave at m's own
// per-series violation counts.
func (res *BacktestResult) OracleSameViolations(m int) Oracle {
	cs := res.curves()
	choice := make([]int, len(cs))
	for i, run := range res.Runs {
		if cs[i].n == 0 {
			continue
		}
		v := 0
		for k, a := range run.Alloc[m] {
			if run.Series.V[k+1] > a {
				v++
			}
		}
		choice[i] = cs[i].withAtMost(v)
	}
	return oracleTotals("const, same per-VM violations", cs, choice)
}

// OracleFleet gives every series a constant allocation so that the
// violations of all series together stay within rate and the total slack
// is least: each series takes its violations where they save the most
// slack (a Lagrangian price per violation, found by bisection). With
// perSeriesCap > 0 no series may exceed that rate. This is the best any
// constant can do on the fleet-wide measure the goal uses, spreading
// violations as unevenly as it pays.
func (res *BacktestResult) OracleFleet(rate, perSeriesCap float64) Oracle {
	cs := res.curves()
	total := 0
	for _, c := range cs {
		total += c.n
	}
	name := "const, fleet-optimal, uneven"
	if perSeriesCap > 0 {
		name = fmt.Sprintf("const, fleet-optimal, each VM ≤ %.3g%%", 100*perSeriesCap)
	}
	limit := func(c constCurve) int {
		if perSeriesCap <= 0 {
			return c.n
		}
		return int(math.Floor(perSeriesCap * float64(c.n)))
	}
	choice := make([]int, len(cs))
	solve := func(lambda float64) int {
		v := 0
		for i := range cs {
			if cs[i].n == 0 {
				continue
			}
			choice[i] = cs[i].pick(lambda, limit(cs[i]))
			v += cs[i].viol[choice[i]]
		}
		return v
	}
	allowed := int(math.Floor(rate * float64(total)))
	// At a price above any series' whole slack, every series takes its
	// fewest violations; at 0, its cheapest constant.
	hi := 1.0
	for _, c := range cs {
		if c.n > 0 {
			hi = max(hi, c.slack[len(c.slack)-1]+1)
		}
	}
	lo := 0.0
	if solve(lo) > allowed {
		for it := 0; it < 100 && hi-lo > 1e-9*hi; it++ {
			mid := (lo + hi) / 2
			if solve(mid) > allowed {
				lo = mid
			} else {
				hi = mid
			}
		}
		solve(hi)
	}
	return oracleTotals(name, cs, choice)
}
