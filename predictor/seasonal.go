package predictor

import (
	"math"
	"math/cmplx"
)

// histLen is how many past samples the seasonal models keep (float32,
// 4 KiB): 3.5 days at 5-minute steps, 17 minutes at 1 s. Periods are
// searched in [minPeriod, histLen/3] so at least three cycles are seen.
const (
	histLen      = 1024
	minPeriod    = 4
	maxPeriod    = histLen / 3
	detectEvery  = 256
	acfThreshold = 0.3
)

// history is a ring of the most recent samples indexed by absolute step.
type history struct {
	v [histLen]float32
	n int // samples seen
}

func (h *history) push(y float64) { h.v[h.n%histLen] = float32(y); h.n++ }

// at returns the sample at absolute step t (must be within the ring).
func (h *history) at(t int) float64 { return float64(h.v[t%histLen]) }

// DetectPeriod returns the lag in [minLag, maxLag] with the highest
// autocorrelation that is a local peak and at least threshold, or 0.
// The autocorrelation is computed through an FFT (Wiener–Khinchin).
func DetectPeriod(x []float64, minLag, maxLag int, threshold float64) int {
	n := len(x)
	if maxLag > n/2 {
		maxLag = n / 2
	}
	if n < 8 || maxLag <= minLag {
		return 0
	}
	acf := autocorr(x)
	if acf == nil {
		return 0
	}
	// Multiples of the period peak too (and the unbiased estimate is noisy
	// at long lags): take the first peak within 10 % of the highest.
	bestV := threshold
	for k := minLag; k <= maxLag && k+1 < len(acf); k++ {
		if acf[k] >= acf[k-1] && acf[k] >= acf[k+1] && acf[k] > bestV {
			bestV = acf[k]
		}
	}
	if bestV == threshold {
		return 0
	}
	for k := minLag; k <= maxLag && k+1 < len(acf); k++ {
		if acf[k] >= acf[k-1] && acf[k] >= acf[k+1] && acf[k] >= 0.9*bestV {
			return k
		}
	}
	return 0
}

// autocorr returns the normalised autocorrelation of x (acf[0] = 1), or nil
// for a constant series.
func autocorr(x []float64) []float64 {
	n := len(x)
	size := 1
	for size < 2*n {
		size <<= 1
	}
	mean := 0.0
	for _, v := range x {
		mean += v
	}
	mean /= float64(n)
	buf := make([]complex128, size)
	for i, v := range x {
		buf[i] = complex(v-mean, 0)
	}
	fft(buf, false)
	for i, c := range buf {
		buf[i] = complex(real(c)*real(c)+imag(c)*imag(c), 0)
	}
	fft(buf, true)
	c0 := real(buf[0])
	if c0 <= 1e-12 {
		return nil
	}
	acf := make([]float64, n)
	for k := range acf {
		// unbiased: divide by the number of pairs at this lag
		acf[k] = real(buf[k]) / c0 * float64(n) / float64(n-k)
	}
	return acf
}

// fft is an in-place iterative radix-2 FFT; len(a) must be a power of two.
// The inverse is not scaled (autocorr only needs ratios).
func fft(a []complex128, inverse bool) {
	n := len(a)
	for i, j := 1, 0; i < n; i++ {
		bit := n >> 1
		for ; j&bit != 0; bit >>= 1 {
			j ^= bit
		}
		j ^= bit
		if i < j {
			a[i], a[j] = a[j], a[i]
		}
	}
	sign := -1.0
	if inverse {
		sign = 1
	}
	for l := 2; l <= n; l <<= 1 {
		w := cmplx.Rect(1, sign*2*math.Pi/float64(l))
		for i := 0; i < n; i += l {
			wk := complex(1, 0)
			for k := 0; k < l/2; k++ {
				u, v := a[i+k], a[i+k+l/2]*wk
				a[i+k], a[i+k+l/2] = u+v, u-v
				wk *= w
			}
		}
	}
}

// holtWinters is additive Holt-Winters with a damped trend; its season
// length is re-detected from the history every detectEvery steps.
type holtWinters struct {
	h             history
	level, trend  float64
	period        int
	season        [maxPeriod]float64
	alpha, beta   float64
	gamma, phi    float64
	scratch       []float64 // reused for period detection (not state)
	detectedSteps int
}

func newHoltWinters() *holtWinters {
	return &holtWinters{alpha: 0.5, beta: 0.05, gamma: 0.2, phi: 0.8}
}

func (m *holtWinters) observe(y float64) {
	t := m.h.n
	if t == 0 {
		m.level = y
	} else {
		s := 0.0
		if m.period > 0 {
			s = m.season[t%m.period]
		}
		prev := m.level
		m.level = m.alpha*(y-s) + (1-m.alpha)*(m.level+m.phi*m.trend)
		m.trend = m.beta*(m.level-prev) + (1-m.beta)*m.phi*m.trend
		if m.period > 0 {
			m.season[t%m.period] = m.gamma*(y-m.level) + (1-m.gamma)*s
		}
	}
	m.h.push(y)
	if m.h.n%detectEvery == 0 && m.h.n >= 3*minPeriod*4 {
		m.detect()
	}
}

// detect looks for a season in the kept history and, when it changes,
// seeds the seasonal terms from the history's per-phase means.
func (m *holtWinters) detect() {
	n := m.h.n
	if n > histLen {
		n = histLen
	}
	if cap(m.scratch) < n {
		m.scratch = make([]float64, n)
	}
	x := m.scratch[:n]
	start := m.h.n - n
	mean := 0.0
	for i := range x {
		x[i] = m.h.at(start + i)
		mean += x[i]
	}
	mean /= float64(n)
	p := DetectPeriod(x, minPeriod, min(maxPeriod, n/3), acfThreshold)
	if p == m.period {
		return
	}
	m.period = p
	if p == 0 {
		return
	}
	var cnt [maxPeriod]int
	for i := 0; i < p; i++ {
		m.season[i] = 0
	}
	for i, v := range x {
		ph := (start + i) % p
		m.season[ph] += v - mean
		cnt[ph]++
	}
	for i := 0; i < p; i++ {
		if cnt[i] > 0 {
			m.season[i] /= float64(cnt[i])
		}
	}
	m.level = mean
	m.trend = 0
}

// predict is the one-step-ahead forecast, floored at 0.
func (m *holtWinters) predict() float64 {
	f := m.level + m.phi*m.trend
	if m.period > 0 {
		f += m.season[m.h.n%m.period]
	}
	return math.Max(f, 0)
}

// seasonalLag returns the sample one period before the next step, and ok
// when a period is known and still in the history.
func (m *holtWinters) seasonalLag() (float64, bool) {
	if m.period == 0 || m.h.n < m.period {
		return 0, false
	}
	return m.h.at(m.h.n - m.period), true
}
