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
//	q ← q + γ_k·(1{y > a} − α),   γ_k = γ·max(1, 1/√(α·k))
//
// so q rises after a violation and falls otherwise; q is stationary exactly
// when violations happen at rate α, whatever the series does, and the
// long-run violation rate converges to α (|rate − α| ≤ (range of q +
// γ)/(γT)). The step γ_k is larger during the first 1/α updates (a
// Robbins–Monro start) so a short series does not spend its whole
// violation budget before q has moved. Nothing is fitted to the judged
// series offline. q starts at the Laplace quantile ln(1/(2α)) — the (1−α)
// quantile of |residual| in units of its mean when residuals are Laplace.
// During the first 1/scaleBeta samples s is the mean |residual| so far
// shrunk towards priorRel × the mean level so far (worth priorWeight
// samples), so the first steps of a new series are neither blind nor
// reckless.
//
// The constants are generic (none was fitted per series; the design was
// done on half of the Bitbrains VMs and confirmed on the other half and on
// PlanetLab, docs/BENCHMARKS.md):
const (
	aciGamma     = 0.08
	scaleBeta    = 0.05 // ≈ 20-step memory of the residual scale
	priorRel     = 0.5
	priorWeight  = 3.0
	qMin, qMax   = -3.0, 60.0
	selectBeta   = 0.01 // ≈ 100-step memory of each member's slack
	slowAlpha    = 0.05 // the slow EWMA member: a mean-reverting series' centre
	outerGammaMu = 0.5  // outer ACI step relative to aciGamma
	// logUnit is the knee of the log transform z = ln(1 + y/(logUnit·ȳ)),
	// relative to the series' running mean ȳ: linear below, logarithmic
	// above (BENCHMARKS.md: 0.1…1 move the Bitbrains ratio between 0.64
	// and 0.69 and leave PlanetLab's at 0.90).
	logUnit  = 0.3
	meanBeta = 0.002 // ≈ 500-step memory of the mean ȳ
	// envWarm: the allocation is capped by the envelope (the maximum of the
	// last histLen samples) once envWarm/α samples are seen — the chance
	// that the next sample exceeds the maximum of N exchangeable ones is
	// 1/(N+1), well under α by then.
	envWarm = 2.0
	// warmCap bounds a multiplicative member's allocation by warmCap × the
	// largest sample seen, so a log-space margin learned on a near-zero
	// series cannot explode when the series wakes up.
	warmCap = 2.0
	arBeta  = 0.02 // ≈ 50-step memory of the deviation variance (persistence learner)
	arRate  = 0.01 // normalised LMS step of the persistence learner
	// DefaultHorizon is how many steps ahead ARS forecasts by default.
	DefaultHorizon = 5
	// MaxHorizon bounds the horizon (state grows with its square).
	MaxHorizon = 8
)

// calib is the per-forecaster ACI state.
type calib struct {
	alpha, gamma float64
	q, s         float64
	q0           float64
	m            float64 // samples seen (counted during warm-up only)
	k            float64 // updates seen
	sumY, sumR   float64 // warm-up sums
	prior        float64 // the warm-up prior residual when set (z space)
	fixedPrior   bool
}

func newCalib(alpha, q0 float64) calib {
	return calib{alpha: alpha, gamma: aciGamma, q: q0, q0: q0}
}

func (c *calib) alloc(yhat float64) float64 { return max(0, yhat+c.q*c.s) }

// start seeds the scale prior from the first sample.
func (c *calib) start(y float64) { c.s = priorRel * y; c.sumY = y; c.m = 1 }

// startZ seeds a z-space calibration: the prior residual is what a
// residual of priorRel × the first sample y is in z (unit lc).
func (c *calib) startZ(y, lc float64) {
	c.prior = math.Log1p(priorRel * y / (y + lc))
	c.fixedPrior = true
	c.s = c.prior
	c.m = 1
}

// update records the outcome y of a step whose forecast was yhat and
// allocation a.
func (c *calib) update(y, yhat, a float64) { c.record(y > a, y, math.Abs(y-yhat)) }

// record takes one ACI step for a violation (or not) and feeds the
// residual r of a sample y to the scale.
func (c *calib) record(violated bool, y, r float64) {
	e := 0.0
	if violated {
		e = 1
	}
	c.k++
	c.q += c.gamma * max(1, math.Sqrt(1/(c.alpha*c.k))) * (e - c.alpha)
	c.q = min(max(c.q, qMin), qMax)
	if c.m < 1/scaleBeta {
		// Warm-up: the mean |residual| so far, shrunk towards a prior of
		// priorRel × the mean level so far, worth priorWeight samples.
		c.m++
		c.sumY += y
		c.sumR += r
		n := c.m - 1 // residuals seen
		p := priorRel * c.sumY / c.m
		if c.fixedPrior {
			p = c.prior
		}
		c.s = (priorWeight*p + c.sumR) / (priorWeight + n)
		return
	}
	c.s += scaleBeta * (r - c.s)
}

func (c *calib) quantile(yhat, p float64) float64 {
	k := max(c.q/max(c.q0, 1e-9), 0)
	if c.q0 == 0 {
		k = 1
	}
	return max(0, yhat+k*laplaceZ(1-p)*c.s)
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
	l := max(r.level, 1e-9)
	r.x = [qrFeatures]float64{1, last / l, ewma / l, mx / l, hw / l, lag / l}
	p := 0.0
	for i, v := range r.x {
		p += r.w[i] * v
	}
	r.pred = max(0, p*l)
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

// The members of the ensemble. Each has its own ACI calibration; the
// "log" members forecast and calibrate z = ln(1 + y/(logUnit·ȳ)) — a
// residual in z is relative to the level, so their margins shrink with the
// level (an idle VM after a burst) instead of keeping the burst's spread.
const (
	candLast    = iota // last value
	candEWMA           // EWMA, weight 0.5
	candHW             // Holt-Winters, season found by FFT autocorrelation
	candQR             // online quantile regression (alone only)
	candMax            // 12-step window max (alone only)
	candSlow           // EWMA, weight slowAlpha
	candLogLast        // last value, in z
	candLogAR          // slow mean + learned persistence × deviation, in z
	nCand
)

// memberName names member i ("-aci" is appended in reports).
func memberName(i int) string {
	return [nCand]string{"last", "ewma", "holtwinters", "quantreg", "max", "slow", "loglast", "logar"}[i]
}

// inEnsemble says whether the selector may follow member i. The quantile
// regression and the short window max are computed (the regression uses
// the max as a feature; both are available alone as quantreg-aci and
// max-aci) but following them raised slack at equal violation
// (docs/BENCHMARKS.md), so the selector leaves them out.
func inEnsemble(i int) bool { return i != candQR && i != candMax }

// isLog says whether member i works in z (log) space.
func isLog(i int) bool { return i == candLogLast || i == candLogAR }

// envelope is the maximum of the last envBlocks×envBlock samples (to
// within one block), O(1) per sample: the maxima of finished blocks are
// reduced once per block.
type envelope struct {
	blocks [envBlocks]float64
	head   int
	full   float64 // max of the finished blocks in the ring
	cur    float64 // max of the block being filled
	inCur  int
}

const envBlock, envBlocks = 32, histLen / 32

func (e *envelope) observe(y float64) {
	if e.inCur == 0 || y > e.cur {
		e.cur = y
	}
	e.inCur++
	if e.inCur < envBlock {
		return
	}
	e.blocks[e.head] = e.cur
	e.head = (e.head + 1) % envBlocks
	e.inCur = 0
	e.full = 0
	for _, b := range e.blocks {
		e.full = max(e.full, b)
	}
}

func (e *envelope) max() float64 { return max(e.full, e.cur) }

// Quantiles is a forecast for one step of the horizon.
type Quantiles struct {
	P50, P95, P99, Alloc float64
}

// horizonCal calibrates the forecasts for h steps ahead (h ≥ 2): every
// member has its own ACI state for that horizon, and so does the outer
// layer, each scored against the outcome h steps later.
type horizonCal struct {
	cal   [nCand]calib
	outer calib
}

// pending is the forecast for h steps ahead waiting for its outcome: each
// member's centre and allocation (in z for log members), the member
// followed and the final allocation.
type pending struct {
	yhat, alloc [nCand]float64
	sel         int
	final       float64
}

// ARS is the calibrated ensemble: several point forecasters (last value, a
// fast and a slow EWMA, Holt-Winters with detected season, and two in log
// space: last value and a learned-persistence AR(1) around the slow mean),
// each with its own ACI calibration. The member whose calibrated
// allocation left the least slack recently is followed (all are calibrated
// to the same violation rate, so the one that needs the least headroom for
// it is the better forecaster), an outer ACI layer corrects what the
// switching itself costs, and the allocation is capped by the envelope of
// the recent past. Forecasts for 2..H steps ahead are calibrated on their
// own, each against the outcome h steps later.
type ARS struct {
	name  string
	alpha float64
	n     int
	only  int // -1 = select; else follow member `only`

	last, ewma, slow float64
	mean, lc, top    float64 // running mean, log unit, largest sample
	zlast, zslow     float64
	phi, dvar, zd    float64 // persistence learner

	mx  *WindowMax // 12-step max, a QR feature
	env envelope   // max of the last ≈histLen samples
	hw  *holtWinters
	qr  *quantReg

	yhat  [nCand]float64 // each member's forecast (z for log members)
	za    [nCand]float64 // log members' allocation in z
	alloc [nCand]float64
	cal   [nCand]calib
	loss  [nCand]float64
	sel   int
	outer calib
	cap   float64
	final float64

	// Horizon: hz[h-2] calibrates h steps ahead; pend[j%H][h-2] is the
	// forecast made after sample j for sample j+h; ahead the current ones.
	hz    []horizonCal
	pend  [][]pending
	ahead []Quantiles // len = horizon
}

// NewARS returns the calibrated ensemble for target violation rate alpha
// with the default horizon.
func NewARS(alpha float64) *ARS { return newARS("ars", alpha, -1, DefaultHorizon) }

// NewARSHorizon returns the calibrated ensemble forecasting h steps ahead
// (1 ≤ h ≤ MaxHorizon; out-of-range values are clamped).
func NewARSHorizon(alpha float64, h int) *ARS { return newARS("ars", alpha, -1, h) }

// NewCalibrated returns one of the ensemble's members alone, with the same
// ACI calibration: "last", "ewma", "holtwinters", "quantreg", "max",
// "slow", "loglast" or "logar" (suffixed "-aci" in reports). It returns nil
// for an unknown name.
func NewCalibrated(member string, alpha float64) *ARS {
	for i := 0; i < nCand; i++ {
		if memberName(i) == member {
			return newARS(member+"-aci", alpha, i, 1)
		}
	}
	return nil
}

func newARS(name string, alpha float64, only, horizon int) *ARS {
	horizon = min(max(horizon, 1), MaxHorizon)
	m := &ARS{name: name, alpha: alpha, only: only, hw: newHoltWinters(),
		qr: newQuantReg(1 - alpha), mx: NewWindowMax("max", 12, 0)}
	z := laplaceZ(alpha)
	for i := range m.cal {
		m.cal[i] = newCalib(alpha, z)
	}
	m.cal[candQR] = newCalib(alpha, 0) // already a quantile
	m.outer = newCalib(alpha, 0)
	m.outer.gamma = aciGamma * outerGammaMu
	if only >= 0 {
		m.sel = only
	}
	m.hz = make([]horizonCal, horizon-1)
	for i := range m.hz {
		m.hz[i].cal = m.cal
		m.hz[i].outer = m.outer
	}
	m.pend = make([][]pending, horizon)
	for i := range m.pend {
		m.pend[i] = make([]pending, horizon-1)
	}
	m.ahead = make([]Quantiles, horizon)
	return m
}

// Name implements Model.
func (m *ARS) Name() string { return m.name }

// Horizon is how many steps ahead Forecast reaches.
func (m *ARS) Horizon() int { return len(m.ahead) }

func (m *ARS) z(y float64) float64   { return math.Log1p(y / m.lc) }
func (m *ARS) unz(z float64) float64 { return max(0, m.lc*math.Expm1(z)) }

// Observe implements Model.
func (m *ARS) Observe(y float64) error {
	if err := checkSample(y); err != nil {
		return err
	}
	if m.n == 0 {
		m.last, m.ewma, m.slow, m.mean = y, y, y, y
		m.lc = max(logUnit*y, 1e-12)
		m.zlast = m.z(y)
		m.zslow, m.phi = m.zlast, 1
		for i := range m.cal {
			if isLog(i) {
				m.cal[i].startZ(y, m.lc)
			} else {
				m.cal[i].start(y)
			}
		}
		m.outer.start(y)
		for i := range m.hz {
			m.hz[i].cal, m.hz[i].outer = m.cal, m.outer
		}
		m.qr.level = y
	} else {
		m.learn(y)
	}
	m.hw.observe(y)
	_ = m.mx.Observe(y)
	m.env.observe(y)
	m.top = max(m.top, y)
	m.n++
	m.forecast()
	return nil
}

// learn scores the forecasts made before y and updates every state.
func (m *ARS) learn(y float64) {
	z := m.z(y)
	for i := range m.cal {
		if isLog(i) {
			m.cal[i].update(z, m.yhat[i], m.za[i])
		} else {
			m.cal[i].update(y, m.yhat[i], m.alloc[i])
		}
		m.loss[i] += max(selectBeta, 1/float64(m.n)) * (max(min(m.alloc[i], m.cap)-y, 0) - m.loss[i])
	}
	m.outer.update(y, m.alloc[m.sel], m.final)
	// Horizons: the sample just seen has index n; the forecast for it made
	// h steps earlier sits in pend[(n-h)%H][h-2].
	H := len(m.pend)
	for h := 2; h <= H && m.n-h >= 0; h++ {
		p, hc := &m.pend[(m.n-h)%H][h-2], &m.hz[h-2]
		for i := range hc.cal {
			if !inEnsemble(i) {
				continue
			}
			if isLog(i) {
				hc.cal[i].update(z, p.yhat[i], p.alloc[i])
			} else {
				hc.cal[i].update(y, p.yhat[i], p.alloc[i])
			}
		}
		hc.outer.record(y > p.final, y, 0)
	}
	m.qr.learn(y)
	m.last = y
	m.ewma += 0.5 * (y - m.ewma)
	m.slow += slowAlpha * (y - m.slow)
	m.mean += max(1/float64(m.n+1), meanBeta) * (y - m.mean)
	// Persistence φ: normalised LMS on the squared error of the z forecast
	// zslow + φ·(z − zslow), φ in [0, 1] (0: noise around a mean, 1: a
	// random walk).
	m.dvar += max(1/float64(m.n), arBeta) * (m.zd*m.zd - m.dvar)
	if m.dvar > 0 {
		m.phi += arRate * (z - m.yhat[candLogAR]) * m.zd / m.dvar
		m.phi = min(max(m.phi, 0), 1)
	}
	m.zslow += slowAlpha * (z - m.zslow)
	// The unit follows the mean; carry the z states over to the new unit.
	slow := m.unz(m.zslow)
	m.lc = max(logUnit*m.mean, 1e-12)
	m.zslow = m.z(slow)
	m.zlast = m.z(y)
}

// forecast computes every member's allocation for the next step, the
// selection, the final allocation and the horizon.
func (m *ARS) forecast() {
	m.cap = math.Inf(1)
	if float64(m.n)*m.alpha >= envWarm {
		m.cap = m.env.max()
	}
	mx, _ := m.mx.Forecast()
	hw := m.hw.predict()
	lag, ok := m.hw.seasonalLag()
	if !ok {
		lag = m.last
	}
	m.qr.features(m.last, m.ewma, mx.P50, hw, lag, m.last)
	m.zd = m.zlast - m.zslow
	m.yhat = [nCand]float64{m.last, m.ewma, hw, m.qr.pred, mx.P50, m.slow, m.zlast, m.zslow + m.phi*m.zd}
	for i := range m.alloc {
		m.alloc[i] = m.cal[i].alloc(m.yhat[i])
		if isLog(i) {
			m.za[i] = m.alloc[i]
			m.alloc[i] = min(m.unz(m.za[i]), warmCap*m.top)
		}
	}
	if m.only < 0 {
		best := m.sel
		for i := range m.loss {
			if inEnsemble(i) && m.loss[i] < m.loss[best]*0.98 { // small hysteresis
				best = i
			}
		}
		m.sel = best
		if float64(m.n)*m.alpha < 1 {
			// Too few samples to judge the members' slack at rate α: follow
			// the slow EWMA, the most conservative centre.
			m.sel = candSlow
		}
	}
	if isLog(m.sel) {
		m.final = min(m.unz(m.za[m.sel]+m.outer.q*m.cal[m.sel].s), warmCap*m.top)
	} else {
		m.final = max(0, m.alloc[m.sel]+m.outer.q*m.cal[m.sel].s)
	}
	m.final = min(m.final, m.cap)

	// Step 1 of the horizon is the ensemble's; steps 2..H follow the
	// persistence learner (its centre decays towards the slow mean as
	// φ^h) with their own calibration.
	c := &m.cal[m.sel]
	q := Quantiles{P50: m.yhat[m.sel], Alloc: m.final}
	if m.sel == candQR {
		q.P50 = m.yhat[candEWMA]
	}
	q.P95 = c.quantile(m.yhat[m.sel], 0.95)
	q.P99 = c.quantile(m.yhat[m.sel], 0.99)
	if isLog(m.sel) {
		q.P50, q.P95, q.P99 = m.unz(q.P50), m.unz(q.P95), m.unz(q.P99)
	}
	q.P95, q.P99 = min(q.P95, m.cap), min(q.P99, m.cap)
	m.ahead[0] = q
	H := len(m.ahead)
	if H == 1 {
		return
	}
	// Steps 2..H: the same members and the same choice, each horizon with
	// its own calibrations; the centres are the members' (the persistence
	// learner's decays towards the slow mean as φ^h).
	slot := m.pend[(m.n-1)%H]
	decay := m.phi
	for h := 2; h <= H; h++ {
		decay *= m.phi
		p, hc := &slot[h-2], &m.hz[h-2]
		p.yhat = m.yhat
		p.yhat[candLogAR] = m.zslow + decay*m.zd
		for i := range p.alloc {
			if inEnsemble(i) {
				p.alloc[i] = hc.cal[i].alloc(p.yhat[i])
			}
		}
		p.sel = m.sel
		c := &hc.cal[m.sel]
		if isLog(m.sel) {
			p.final = min(m.unz(p.alloc[m.sel]+hc.outer.q*c.s), warmCap*m.top)
		} else {
			p.final = max(0, p.alloc[m.sel]+hc.outer.q*c.s)
		}
		p.final = min(p.final, m.cap)
		m.ahead[h-1] = Quantiles{Alloc: p.final} // quantiles filled in by Forecast
	}
}

// Forecast implements Model. Ahead holds steps 1..Horizon(); step 1 is
// also in the top-level fields. P95 and P99 are the followed member's
// calibrated quantiles assuming Laplace residuals, scaled by how far the
// calibration had to move from that assumption.
func (m *ARS) Forecast() (Forecast, bool) {
	if m.n == 0 {
		return Forecast{}, false
	}
	q := m.ahead[0]
	f := Forecast{P50: q.P50, P95: q.P95, P99: q.P99, Alloc: q.Alloc, Samples: m.n}
	f.Horizon = copy(f.Ahead[:], m.ahead)
	if H := len(m.ahead); H > 1 {
		// Steps 2..H: the quantiles around the pending centres (computed
		// here, not per sample, as only callers of Forecast need them).
		slot := m.pend[(m.n-1)%H]
		for h := 2; h <= H; h++ {
			p := &slot[h-2]
			c, yh := &m.hz[h-2].cal[p.sel], p.yhat[p.sel]
			a := &f.Ahead[h-1]
			a.P50, a.P95, a.P99 = yh, c.quantile(yh, 0.95), c.quantile(yh, 0.99)
			if isLog(p.sel) {
				a.P50, a.P95, a.P99 = m.unz(a.P50), m.unz(a.P95), m.unz(a.P99)
			}
			a.P95, a.P99 = min(a.P95, m.cap), min(a.P99, m.cap)
		}
	}
	return f, true
}

// Selected reports which member the ensemble follows now.
func (m *ARS) Selected() string { return memberName(m.sel) }
