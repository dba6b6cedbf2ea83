package predictor

import (
	"math"
)

// This file holds the simple models, each usable alone and as a baseline:
// last value, moving-window maximum (Autopilot), decaying-histogram
// percentile (VPA recommender / Autopilot CPU), Holt-Winters with a season
// found by autocorrelation, and an online quantile regression.
// All counts of time are in steps (samples); callers convert durations with
// the step of their series (1 s live, 300 s on the public traces).

// LastValue forecasts the next sample to equal the last one, scaled by
// 1+Margin for the allocation.
type LastValue struct {
	Margin float64
	last   float64
	n      int
}

// NewLastValue returns the last-value model.
func NewLastValue(margin float64) *LastValue { return &LastValue{Margin: margin} }

// Name implements Model.
func (m *LastValue) Name() string { return "last" }

// Observe implements Model.
func (m *LastValue) Observe(v float64) error {
	if err := checkSample(v); err != nil {
		return err
	}
	m.last = v
	m.n++
	return nil
}

// Forecast implements Model.
func (m *LastValue) Forecast() (Forecast, bool) {
	if m.n == 0 {
		return Forecast{}, false
	}
	a := m.last * (1 + m.Margin)
	return Forecast{P50: m.last, P95: a, P99: a, Alloc: a, Samples: m.n}, true
}

// windowBlocks bounds the state of WindowMax: a window longer than this many
// steps is kept as the maxima of equal blocks, so its edge is exact to
// within one block and the state stays under 2 KiB at any resolution.
const windowBlocks = 256

// WindowMax is the maximum over a moving window (Autopilot's max
// recommender), optionally scaled by 1+Margin.
type WindowMax struct {
	name   string
	Margin float64
	block  int       // steps per block
	maxes  []float64 // ring of finished block maxima
	head   int       // next slot in maxes
	filled int
	cur    float64 // max of the block being filled
	inCur  int
	n      int
}

// NewWindowMax returns a moving-window max over window steps (≥ 1).
func NewWindowMax(name string, window int, margin float64) *WindowMax {
	if window < 1 {
		window = 1
	}
	block := (window + windowBlocks - 1) / windowBlocks
	nb := (window + block - 1) / block
	return &WindowMax{name: name, Margin: margin, block: block, maxes: make([]float64, nb)}
}

// Name implements Model.
func (m *WindowMax) Name() string { return m.name }

// Observe implements Model.
func (m *WindowMax) Observe(v float64) error {
	if err := checkSample(v); err != nil {
		return err
	}
	if m.inCur == 0 || v > m.cur {
		m.cur = v
	}
	m.inCur++
	m.n++
	if m.inCur == m.block {
		m.maxes[m.head] = m.cur
		m.head = (m.head + 1) % len(m.maxes)
		if m.filled < len(m.maxes) {
			m.filled++
		}
		m.inCur = 0
	}
	return nil
}

// Forecast implements Model.
func (m *WindowMax) Forecast() (Forecast, bool) {
	if m.n == 0 {
		return Forecast{}, false
	}
	mx := 0.0
	if m.inCur > 0 {
		mx = m.cur
	}
	// When a block is in progress the oldest finished block partly left
	// the window; dropping it keeps the window at most `window` long.
	k := m.filled
	if m.inCur > 0 && k == len(m.maxes) {
		k--
	}
	for i := 0; i < k; i++ {
		idx := (m.head - 1 - i + 2*len(m.maxes)) % len(m.maxes)
		if m.maxes[idx] > mx {
			mx = m.maxes[idx]
		}
	}
	a := mx * (1 + m.Margin)
	return Forecast{P50: mx, P95: a, P99: a, Alloc: a, Samples: m.n}, true
}

// Histogram buckets: geometric with ratio 1.05 (as in the VPA recommender)
// from histMin upward; values below histMin fall in bucket 0. 900 buckets
// reach 1e-3×1.05^900 ≈ 1.3e16, enough for millicores, MHz, KB or bytes.
const (
	histMin     = 1e-3
	histRatio   = 1.05
	histBuckets = 900
)

var histLogRatio = math.Log(histRatio)

func histBucket(v float64) int {
	if v < histMin {
		return 0
	}
	b := 1 + int(math.Log(v/histMin)/histLogRatio)
	if b >= histBuckets {
		b = histBuckets - 1
	}
	return b
}

// histBucketEnd is the upper edge of bucket b.
func histBucketEnd(b int) float64 {
	return histMin * math.Pow(histRatio, float64(b))
}

// DecayHist is the percentile of a histogram whose sample weights decay
// exponentially with age (half-life in steps), times 1+Margin: the VPA
// recommender's target is p90 with a 24 h half-life and 15 % margin, and
// Autopilot's CPU recommender p95 with a 12 h half-life. Like VPA it
// reports the upper edge of the bucket holding the percentile.
type DecayHist struct {
	name     string
	Q        float64
	Margin   float64
	halfLife float64
	w        [histBuckets]float32 // 3.6 KiB
	total    float64
	wNext    float64 // weight of the next sample (grows instead of decaying the past)
	lo, hi   int     // occupied bucket range
	n        int
}

// NewDecayHist returns a decaying-histogram percentile model.
func NewDecayHist(name string, q, halfLifeSteps, margin float64) *DecayHist {
	if halfLifeSteps <= 0 {
		halfLifeSteps = 1
	}
	return &DecayHist{name: name, Q: q, Margin: margin, halfLife: halfLifeSteps, wNext: 1, lo: histBuckets}
}

// Name implements Model.
func (m *DecayHist) Name() string { return m.name }

// Observe implements Model.
func (m *DecayHist) Observe(v float64) error {
	if err := checkSample(v); err != nil {
		return err
	}
	b := histBucket(v)
	m.w[b] += float32(m.wNext)
	m.total += m.wNext
	if b < m.lo {
		m.lo = b
	}
	if b > m.hi {
		m.hi = b
	}
	m.n++
	m.wNext *= math.Exp2(1 / m.halfLife)
	if m.wNext > 1e20 { // rescale everything; relative weights unchanged
		s := 1 / m.wNext
		m.total = 0
		for i := m.lo; i <= m.hi; i++ {
			m.w[i] *= float32(s)
			m.total += float64(m.w[i])
		}
		m.wNext = 1
	}
	return nil
}

// quantile returns the upper edge of the bucket holding quantile q.
func (m *DecayHist) quantile(q float64) float64 {
	th := q * m.total
	sum := 0.0
	b := m.lo
	for ; b < m.hi; b++ {
		sum += float64(m.w[b])
		if sum >= th {
			break
		}
	}
	if b == 0 && m.w[0] > 0 && m.hi == 0 {
		return 0 // only (near-)zero samples seen
	}
	return histBucketEnd(b)
}

// Forecast implements Model.
func (m *DecayHist) Forecast() (Forecast, bool) {
	if m.n == 0 {
		return Forecast{}, false
	}
	a := m.quantile(m.Q) * (1 + m.Margin)
	return Forecast{P50: m.quantile(0.5), P95: m.quantile(0.95), P99: m.quantile(0.99), Alloc: a, Samples: m.n}, true
}
