package predictor

import (
	"bufio"
	"fmt"
	"io"
	"math"
	"runtime"
	"sort"
	"strconv"
	"sync"
	"time"
)

// Backtest protocol (shared/data/README.md): for every series and every step
// after its first, the allocation is decided from the samples before that
// step only (Observe(v[i-1]) then Forecast().Alloc is the allocation for
// v[i]). Violation rate = share of steps with usage > allocation; slack =
// Σ max(allocation − usage, 0) / Σ usage; MAE = mean |P50 − usage|.

// BacktestConfig says what to replay.
type BacktestConfig struct {
	Models []string      // model names (NewByName); empty = ModelNames()
	Alpha  float64       // target violation rate
	Step   time.Duration // the series' sampling step
	// Workers replays series in parallel (default GOMAXPROCS).
	Workers int
}

// ModelResult is one model's totals over all series.
type ModelResult struct {
	Name       string
	Steps      int
	Violations int
	Slack      float64 // Σ max(a−u,0) / Σ u
	MAE        float64
	sumSlack   float64
	sumUsage   float64
	sumAbsErr  float64
}

// ViolationRate is Violations / Steps.
func (r ModelResult) ViolationRate() float64 {
	if r.Steps == 0 {
		return 0
	}
	return float64(r.Violations) / float64(r.Steps)
}

// SeriesRun holds one series' per-step allocations for every model:
// Alloc[m][i-1] is model m's allocation for step i (i ≥ 1).
type SeriesRun struct {
	Series *Series
	Alloc  [][]float64
	AbsErr []float64 // Σ |P50 − usage| per model
}

// BacktestResult is the outcome of a replay.
type BacktestResult struct {
	Models  []ModelResult
	Runs    []SeriesRun
	Elapsed time.Duration
}

// Backtest replays every series through fresh instances of each model.
func Backtest(series []Series, cfg BacktestConfig) (*BacktestResult, error) {
	if len(cfg.Models) == 0 {
		cfg.Models = ModelNames()
	}
	for _, n := range cfg.Models {
		if _, err := NewByName(n, cfg.Alpha, cfg.Step); err != nil {
			return nil, err
		}
	}
	w := cfg.Workers
	if w <= 0 {
		w = runtime.GOMAXPROCS(0)
	}
	start := time.Now()
	res := &BacktestResult{Runs: make([]SeriesRun, len(series))}
	var wg sync.WaitGroup
	next := make(chan int)
	errs := make(chan error, w)
	for k := 0; k < w; k++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				run, err := replay(&series[i], cfg)
				if err != nil {
					errs <- err
					for range next {
					}
					return
				}
				res.Runs[i] = run
			}
		}()
	}
	for i := range series {
		next <- i
	}
	close(next)
	wg.Wait()
	select {
	case err := <-errs:
		return nil, err
	default:
	}
	res.Models = make([]ModelResult, len(cfg.Models))
	for m, n := range cfg.Models {
		r := ModelResult{Name: n}
		for _, run := range res.Runs {
			for i, a := range run.Alloc[m] {
				u := run.Series.V[i+1]
				r.Steps++
				if u > a {
					r.Violations++
				} else {
					r.sumSlack += a - u
				}
				r.sumUsage += u
			}
		}
		res.Models[m] = r
	}
	// MAE needs P50s; replay keeps them summed per series.
	for m := range res.Models {
		for _, run := range res.Runs {
			res.Models[m].sumAbsErr += run.AbsErr[m]
		}
		r := &res.Models[m]
		if r.sumUsage > 0 {
			r.Slack = r.sumSlack / r.sumUsage
		}
		if r.Steps > 0 {
			r.MAE = r.sumAbsErr / float64(r.Steps)
		}
	}
	res.Elapsed = time.Since(start)
	return res, nil
}

func replay(s *Series, cfg BacktestConfig) (SeriesRun, error) {
	run := SeriesRun{Series: s, Alloc: make([][]float64, len(cfg.Models)), AbsErr: make([]float64, len(cfg.Models))}
	n := len(s.V)
	for m, name := range cfg.Models {
		model, err := NewByName(name, cfg.Alpha, cfg.Step)
		if err != nil {
			return run, err
		}
		alloc := make([]float64, n-1)
		absErr := 0.0
		for i := 1; i < n; i++ {
			if err := model.Observe(s.V[i-1]); err != nil {
				return run, fmt.Errorf("%s step %d: %w", s.VM, i-1, err)
			}
			f, _ := model.Forecast()
			alloc[i-1] = f.Alloc
			absErr += math.Abs(f.P50 - s.V[i])
		}
		run.AbsErr[m] = absErr
		run.Alloc[m] = alloc
	}
	return run, nil
}

// Hindsight is a baseline given, with hindsight, the one multiplicative
// factor K (allocation × K, the same for every series) that brings its
// violation rate down (or up) to a reference rate.
type Hindsight struct {
	Name          string
	K             float64
	ViolationRate float64
	Slack         float64
	// PerSeries is each series' violation rate at K: one fleet-wide K
	// meets the rate on average, not for every VM.
	PerSeries []float64
}

// perSeriesViolation returns each series' violation rate with model m's
// allocations scaled by k.
func (res *BacktestResult) perSeriesViolation(m int, k float64) []float64 {
	out := make([]float64, 0, len(res.Runs))
	for _, run := range res.Runs {
		v := 0
		for i, a := range run.Alloc[m] {
			if run.Series.V[i+1] > a*k {
				v++
			}
		}
		if n := len(run.Alloc[m]); n > 0 {
			out = append(out, float64(v)/float64(n))
		}
	}
	return out
}

// spread summarises per-series violation rates: the 90th percentile and
// the share of series above twice the target.
func spread(rates []float64, target float64) (p90, over float64) {
	if len(rates) == 0 {
		return 0, 0
	}
	s := append([]float64(nil), rates...)
	sort.Float64s(s)
	n := 0
	for _, r := range s {
		if r > 2*target {
			n++
		}
	}
	return s[int(0.9*float64(len(s)-1))], float64(n) / float64(len(s))
}

// HindsightMargin finds, for model m, the smallest factor K ≥ 0 whose
// violation rate is at most rate, and the slack at K.
func (res *BacktestResult) HindsightMargin(m int, rate float64) Hindsight {
	var ratios []float64
	total := 0
	for _, run := range res.Runs {
		for i, a := range run.Alloc[m] {
			u := run.Series.V[i+1]
			total++
			switch {
			case u == 0:
				ratios = append(ratios, 0)
			case a <= 0:
				ratios = append(ratios, math.Inf(1))
			default:
				ratios = append(ratios, u/a)
			}
		}
	}
	h := Hindsight{Name: res.Models[m].Name}
	if total == 0 {
		return h
	}
	sort.Sort(sort.Reverse(sort.Float64Slice(ratios)))
	allowed := int(math.Floor(rate * float64(total)))
	if allowed >= total {
		allowed = total - 1
	}
	h.K = ratios[allowed]
	if math.IsInf(h.K, 1) {
		h.Slack = math.Inf(1)
		return h
	}
	var viol int
	var slack, usage float64
	for _, run := range res.Runs {
		for i, a := range run.Alloc[m] {
			u := run.Series.V[i+1]
			ka := a * h.K
			if u > ka {
				viol++
			} else {
				slack += ka - u
			}
			usage += u
		}
	}
	h.ViolationRate = float64(viol) / float64(total)
	h.PerSeries = res.perSeriesViolation(m, h.K)
	if usage > 0 {
		h.Slack = slack / usage
	}
	return h
}

// WriteAllocations writes "vm_id,timestamp_s,usage,allocation" for model m,
// one row per step after each series' first; numbers are printed so they
// parse back to the same float64.
func (res *BacktestResult) WriteAllocations(w io.Writer, m int) error {
	bw := bufio.NewWriterSize(w, 1<<16)
	bw.WriteString("vm_id,timestamp_s,usage,allocation\n")
	var b []byte
	for _, run := range res.Runs {
		s := run.Series
		for i, a := range run.Alloc[m] {
			b = b[:0]
			b = append(b, s.VM...)
			b = append(b, ',')
			b = strconv.AppendInt(b, s.T[i+1], 10)
			b = append(b, ',')
			b = strconv.AppendFloat(b, s.V[i+1], 'g', -1, 64)
			b = append(b, ',')
			b = strconv.AppendFloat(b, a, 'g', -1, 64)
			b = append(b, '\n')
			if _, err := bw.Write(b); err != nil {
				return err
			}
		}
	}
	return bw.Flush()
}

// WriteSummary prints the per-model table and the goal comparison against
// the baselines with hindsight margins at the reference model's violation
// rate (ref is an index into res.Models, or -1 to skip the comparison).
func (res *BacktestResult) WriteSummary(w io.Writer, target float64, ref int) {
	fmt.Fprintf(w, "%-20s %8s %10s %10s %12s\n", "model", "steps", "violation", "slack", "MAE")
	for _, r := range res.Models {
		fmt.Fprintf(w, "%-20s %8d %9.3f%% %10.4f %12.4g\n", r.Name, r.Steps, 100*r.ViolationRate(), r.Slack, r.MAE)
	}
	if ref < 0 {
		return
	}
	rr := res.Models[ref]
	v := rr.ViolationRate()
	p90, over := spread(res.perSeriesViolation(ref, 1), target)
	fmt.Fprintf(w, "\ngoal: %s at target %.3g: violation %.3f%% (want 1%%..2.5%%), slack %.4f; per-VM violation p90 %.2f%%, VMs over 2×target %.1f%%\n",
		rr.Name, target, 100*v, rr.Slack, 100*p90, 100*over)
	fmt.Fprintf(w, "baselines with one fleet-wide hindsight margin K to reach %.3f%% violation:\n", 100*v)
	fmt.Fprintf(w, "%-20s %10s %10s %10s %12s %10s %10s\n", "baseline", "K", "violation", "slack", rr.Name+"/base", "VM p90", "VMs>2×tgt")
	best := math.Inf(1)
	isBase := map[string]bool{}
	for _, n := range BaselineNames() {
		isBase[n] = true
	}
	for m, r := range res.Models {
		if !isBase[r.Name] {
			continue
		}
		h := res.HindsightMargin(m, v)
		hp90, hover := spread(h.PerSeries, target)
		if math.IsInf(h.K, 1) {
			fmt.Fprintf(w, "%-20s %10s  (allocates 0 where usage > 0 on more than %.3f%% of steps: no margin reaches it)\n", h.Name, "inf", 100*v)
			continue
		}
		fmt.Fprintf(w, "%-20s %10.4f %9.3f%% %10.4f %12.3f %9.2f%% %9.1f%%\n", h.Name, h.K, 100*h.ViolationRate, h.Slack, rr.Slack/h.Slack, 100*hp90, 100*hover)
		best = math.Min(best, h.Slack)
	}
	if math.IsInf(best, 1) {
		return
	}
	ok := v >= 0.01 && v <= 0.025 && rr.Slack <= 0.70*best
	fmt.Fprintf(w, "best baseline slack %.4f; %s/best = %.3f (goal ≤ 0.70); goal met: %v\n", best, rr.Name, rr.Slack/best, ok)
	fmt.Fprintf(w, "hindsight references: one constant allocation per VM, chosen after seeing the whole series (oracle.go):\n")
	fmt.Fprintf(w, "%-38s %10s %10s %10s %10s %10s %10s\n", "reference", "violation", "slack", rr.Name+"/ref", "ref/best", "VM p90", "VMs>2×tgt")
	for _, o := range []Oracle{res.OracleSameViolations(ref), res.OracleFleet(v, 2*target), res.OracleFleet(v, 0)} {
		op90, oover := spread(o.PerSeries, target)
		fmt.Fprintf(w, "%-38s %9.3f%% %10.4f %10.3f %10.3f %9.2f%% %9.1f%%\n", o.Name, 100*o.ViolationRate, o.Slack, rr.Slack/o.Slack, o.Slack/best, 100*op90, 100*oover)
	}
}

// Index returns the position of a model name in the result, or -1.
func (res *BacktestResult) Index(name string) int {
	for i, r := range res.Models {
		if r.Name == name {
			return i
		}
	}
	return -1
}

// HorizonResult is the ars model's score h steps ahead.
type HorizonResult struct {
	H          int
	Steps      int
	Violations int
	Slack      float64 // Σ max(a−u,0) / Σ u
}

// ViolationRate is Violations / Steps.
func (r HorizonResult) ViolationRate() float64 {
	if r.Steps == 0 {
		return 0
	}
	return float64(r.Violations) / float64(r.Steps)
}

// BacktestHorizon replays every series through "ars" forecasting horizon
// steps ahead and scores the allocation made for h steps ahead (Ahead[h-1],
// decided after sample j) against sample j+h, for h = 1..horizon.
func BacktestHorizon(series []Series, alpha float64, horizon int) ([]HorizonResult, error) {
	if horizon < 1 || horizon > MaxHorizon {
		return nil, fmt.Errorf("predictor: horizon must be in [1, %d], got %d", MaxHorizon, horizon)
	}
	type acc struct {
		steps, viol  [MaxHorizon]int
		slack, usage [MaxHorizon]float64
	}
	parts := make([]acc, len(series))
	var wg sync.WaitGroup
	next := make(chan int)
	errs := make(chan error, runtime.GOMAXPROCS(0))
	for k := 0; k < runtime.GOMAXPROCS(0); k++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				s := &series[i]
				m := NewARSHorizon(alpha, horizon)
				a := &parts[i]
				for j, v := range s.V {
					if err := m.Observe(v); err != nil {
						errs <- fmt.Errorf("%s step %d: %w", s.VM, j, err)
						for range next {
						}
						return
					}
					f, _ := m.Forecast()
					for h := 1; h <= horizon && j+h < len(s.V); h++ {
						u, al := s.V[j+h], f.Ahead[h-1].Alloc
						a.steps[h-1]++
						a.usage[h-1] += u
						if u > al {
							a.viol[h-1]++
						} else {
							a.slack[h-1] += al - u
						}
					}
				}
			}
		}()
	}
	for i := range series {
		next <- i
	}
	close(next)
	wg.Wait()
	select {
	case err := <-errs:
		return nil, err
	default:
	}
	out := make([]HorizonResult, horizon)
	for h := range out {
		var usage, slack float64
		out[h].H = h + 1
		for _, a := range parts {
			out[h].Steps += a.steps[h]
			out[h].Violations += a.viol[h]
			usage += a.usage[h]
			slack += a.slack[h]
		}
		if usage > 0 {
			out[h].Slack = slack / usage
		}
	}
	return out, nil
}
