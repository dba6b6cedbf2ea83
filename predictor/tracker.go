package predictor

import "math"

// Tracker accumulates a model's live prediction error for export as
// metrics: call Record with the forecast made before a sample and the
// sample itself. The zero value is ready to use.
type Tracker struct {
	Steps      uint64
	Violations uint64  // samples above the allocation
	AbsErr     float64 // Σ |P50 − actual|
	Slack      float64 // Σ max(Alloc − actual, 0)
	Usage      float64 // Σ actual
	// RecentViolation is an EWMA (≈ 100 steps) of the violation indicator.
	RecentViolation float64
}

// Record adds one step.
func (t *Tracker) Record(f Forecast, actual float64) {
	if math.IsNaN(actual) || math.IsInf(actual, 0) {
		return
	}
	t.Steps++
	v := 0.0
	if actual > f.Alloc {
		t.Violations++
		v = 1
	} else {
		t.Slack += f.Alloc - actual
	}
	t.AbsErr += math.Abs(f.P50 - actual)
	t.Usage += actual
	t.RecentViolation += math.Max(0.01, 1/float64(t.Steps)) * (v - t.RecentViolation)
}

// MAE is the mean absolute error of P50 so far.
func (t *Tracker) MAE() float64 {
	if t.Steps == 0 {
		return 0
	}
	return t.AbsErr / float64(t.Steps)
}

// ViolationRate is the share of steps above the allocation so far.
func (t *Tracker) ViolationRate() float64 {
	if t.Steps == 0 {
		return 0
	}
	return float64(t.Violations) / float64(t.Steps)
}
