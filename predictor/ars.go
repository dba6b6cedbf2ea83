package predictor

import (
	"math"
)

// Calibration (adaptive conformal inference, Gibbs & Candès 2021, with the
// score normalised by a running scale as in conformalised quantile
// tracking). A point forecaster gives ŷ; the allocation is
//
//	a = max(0, ŷ + q·s)
//
// where s is a running mean of |y − ŷ| and q a multiplier. After each step
//
//	q ← q + γ·(1{y > a} − α)
//
// so q rises by γ(1−α) after a violation and falls by γα otherwise; q is
// stationary exactly when violations happen at rate α, whatever the series
// does, and the long-run violation rate converges to α (|rate − α| ≤
// (range of q + γ)/(γT)). Nothing is fitted to the judged series offline.
// q starts at the Laplace quantile ln(1/(2α)) — the (1−α) quantile of
// |residual| in units of its mean when residuals are Laplace. During the
// first 1/scaleBeta samples s is the mean |residual| so far shrunk towards
// priorRel × the mean level so far (worth priorWeight samples), so the
// first steps of a new series are neither blind nor reckless.
const (
	aciGamma     = 0.08
	scaleBeta    = 0.05 // ≈ 20-step memory of the residual scale
	priorRel     = 0.5
	priorWeight  = 3.0
	qMin, qMax   = -3.0, 60.0
	selectBeta   = 0.03 // ≈ 33-step memory of each candidate's loss
	slowAlpha    = 0.05 // the slow EWMA member: a mean-reverting series' centre
	outerGammaMu = 0.5  // outer ACI step relative to aciGamma
)

// calib is the per-forecaster ACI state.
type calib struct {
	alpha, gamma float64
	q, s         float64
	q0           float64
	m            float64 // samples seen (counted during warm-up only)
	sumY, sumR   float64 // warm-up sums
}

func newCalib(alpha, q0 float64) calib {
	return calib{alpha: alpha, gamma: aciGamma, q: q0, q0: q0}
}

func (c *calib) alloc(yhat float64) float64 { return math.Max(0, yhat+c.q*c.s) }

// start seeds the scale prior from the first sample.
func (c *calib) start(y float64) { c.s = priorRel * y; c.sumY = y; c.m = 1 }

// update records the outcome y of a step whose forecast was yhat and
// allocation a.
func (c *calib) update(y, yhat, a float64) {
	e := 0.0
	if y > a {
		e = 1
	}
	c.q += c.gamma * (e - c.alpha)
	c.q = math.Min(math.Max(c.q, qMin), qMax)
	r := math.Abs(y - yhat)
	if c.m < 1/scaleBeta {
		// Warm-up: the mean |residual| so far, shrunk towards a prior of
		// priorRel × the mean level so far, worth priorWeight samples.
		c.m++
		c.sumY += y
		c.sumR += r
		n := c.m - 1 // residuals seen
		c.s = (priorWeight*priorRel*c.sumY/c.m + c.sumR) / (priorWeight + n)
		return
	}
	c.s += scaleBeta * (r - c.s)
}

func (c *calib) quantile(yhat, p float64) float64 {
	k := math.Max(c.q/math.Max(c.q0, 1e-9), 0)
	if c.q0 == 0 {
		k = 1
	}
	return math.Max(0, yhat+k*laplaceZ(1-p)*c.s)
}

// laplaceZ is the p-quantile of |Laplace| residuals in units of their mean.
func laplaceZ(alpha float64) float64 { return math.Log(1 / (2 * alpha)) }

// pinball is the quantile (check) loss of allocation a at level tau.
func pinball(y, a, tau float64) float64 {
	if y > a {
		return tau * (y - a)
	}
	return (1 - tau) * (a - y)
}

// quantReg is an online linear quantile regression on scale-free features
// (the recent samples, an EWMA, the Holt-Winters forecast and the sample
// one season ago, all divided by a running level), trained by normalised
// SGD on the pinball loss at level tau.
type quantReg struct {
	tau, lr float64
	w       [qrFeatures]float64
	x       [qrFeatures]float64
	level   float64
	pred    float64
}

const qrFeatures = 6

func newQuantReg(tau float64) *quantReg {
	r := &quantReg{tau: tau, lr: 0.05}
	r.w[1] = 1 // start as "last value"
	return r
}

// features sets the inputs for the next prediction.
func (r *quantReg) features(last, ewma, mx, hw, lag float64, y float64) {
	r.level += 0.05 * (y - r.level)
	l := math.Max(r.level, 1e-9)
	r.x = [qrFeatures]float64{1, last / l, ewma / l, mx / l, hw / l, lag / l}
	p := 0.0
	for i, v := range r.x {
		p += r.w[i] * v
	}
	r.pred = math.Max(0, p*l)
}

// learn takes one SGD step on the pinball loss for outcome y.
func (r *quantReg) learn(y float64) {
	g := 1 - r.tau // d loss / d pred when y ≤ pred
	if y > r.pred {
		g = -r.tau
	}
	norm := 1.0
	for _, v := range r.x {
		norm += v * v
	}
	step := r.lr * g / norm
	for i, v := range r.x {
		r.w[i] -= step * v
	}
}

// ARS is the calibrated ensemble: several point forecasters (last value,
// a fast and a slow EWMA, Holt-Winters with detected season; the quantile regression and a
// short window max run alongside, see inEnsemble), each with its own ACI
// calibration; the one with the lowest recent pinball loss at level 1−α is
// followed, and an outer ACI layer corrects what the
// switching itself costs so the whole keeps the target violation rate.
type ARS struct {
	name  string
	alpha float64
	n     int

	last, ewma, slow float64
	mx               *WindowMax // 12-step max, a QR feature
	hw               *holtWinters
	qr               *quantReg
	only             int // -1 = select; else follow candidate `only`

	yhat  [nCand]float64
	alloc [nCand]float64
	cal   [nCand]*calib
	loss  [nCand]float64
	sel   int
	outer *calib
	final float64
}

const (
	candLast = iota
	candEWMA
	candHW
	candQR
	candMax
	candSlow
	nCand
)

var candNames = [nCand]string{"last", "ewma", "holtwinters", "quantreg", "max", "slow"}

// inEnsemble marks the members the selector may follow. The quantile
// regression and the short window max are computed (the regression uses
// the max as a feature; both are available alone as quantreg-aci and
// max-aci) but following them raised slack on both shared traces at equal
// violation (docs/BENCHMARKS.md), so the selector leaves them out.
var inEnsemble = [nCand]bool{candLast: true, candEWMA: true, candHW: true, candSlow: true}

// NewARS returns the calibrated ensemble for target violation rate alpha.
func NewARS(alpha float64) *ARS { return newARS("ars", alpha, -1) }

// NewCalibrated returns one of the ensemble's members alone, with the same
// ACI calibration: "last", "ewma", "holtwinters", "quantreg", "max" or
// "slow" (suffixed "-aci" in reports). It returns nil for an unknown name.
func NewCalibrated(member string, alpha float64) *ARS {
	for i, n := range candNames {
		if n == member {
			return newARS(n+"-aci", alpha, i)
		}
	}
	return nil
}

func newARS(name string, alpha float64, only int) *ARS {
	m := &ARS{name: name, alpha: alpha, only: only, hw: newHoltWinters(),
		qr: newQuantReg(1 - alpha), mx: NewWindowMax("max", 12, 0)}
	z := laplaceZ(alpha)
	for i := range m.cal {
		c := newCalib(alpha, z)
		m.cal[i] = &c
	}
	c := newCalib(alpha, 0) // already a quantile
	m.cal[candQR] = &c
	o := newCalib(alpha, 0)
	o.gamma = aciGamma * outerGammaMu
	m.outer = &o
	if only >= 0 {
		m.sel = only
	}
	return m
}

// Name implements Model.
func (m *ARS) Name() string { return m.name }

// Observe implements Model.
func (m *ARS) Observe(y float64) error {
	if err := checkSample(y); err != nil {
		return err
	}
	if m.n == 0 {
		m.last, m.ewma, m.slow = y, y, y
		for i := range m.cal {
			m.cal[i].start(y)
		}
		m.outer.start(y)
		m.qr.level = y
	} else {
		tau := 1 - m.alpha
		for i := range m.cal {
			m.cal[i].update(y, m.yhat[i], m.alloc[i])
			m.loss[i] += math.Max(selectBeta, 1/float64(m.n)) * (pinball(y, m.alloc[i], tau) - m.loss[i])
		}
		m.outer.update(y, m.alloc[m.sel], m.final)
		m.qr.learn(y)
		m.last = y
		m.ewma += 0.5 * (y - m.ewma)
		m.slow += slowAlpha * (y - m.slow)
	}
	m.hw.observe(y)
	_ = m.mx.Observe(y)
	m.n++

	// Forecasts for the next step.
	mx, _ := m.mx.Forecast()
	hw := m.hw.predict()
	lag, ok := m.hw.seasonalLag()
	if !ok {
		lag = m.last
	}
	m.qr.features(m.last, m.ewma, mx.P50, hw, lag, y)
	m.yhat = [nCand]float64{m.last, m.ewma, hw, m.qr.pred, mx.P50, m.slow}
	for i := range m.alloc {
		m.alloc[i] = m.cal[i].alloc(m.yhat[i])
	}
	if m.only < 0 {
		best := m.sel
		for i := range m.loss {
			if !inEnsemble[i] {
				continue
			}
			if m.loss[i] < m.loss[best]*0.98 { // small hysteresis
				best = i
			}
		}
		m.sel = best
	}
	m.final = math.Max(0, m.alloc[m.sel]+m.outer.q*m.cal[m.sel].s)
	return nil
}

// Forecast implements Model. P95 and P99 are the selected forecaster's
// calibrated quantiles assuming Laplace residuals, scaled by how far the
// calibration had to move from that assumption.
func (m *ARS) Forecast() (Forecast, bool) {
	if m.n == 0 {
		return Forecast{}, false
	}
	c := m.cal[m.sel]
	p50 := m.yhat[m.sel]
	if m.sel == candQR {
		p50 = m.yhat[candEWMA]
	}
	f := Forecast{P50: p50, Alloc: m.final, Samples: m.n}
	f.P95 = c.quantile(m.yhat[m.sel], 0.95)
	f.P99 = c.quantile(m.yhat[m.sel], 0.99)
	return f, true
}

// Selected reports which member the ensemble follows now.
func (m *ARS) Selected() string { return candNames[m.sel] }
