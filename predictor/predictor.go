// Package predictor is the Workload Analysis Module (WAM): it turns a
// series of demand observations per VM and resource into forecasts. It owns
// the Model interface every forecasting model implements and the models
// themselves; it never reads the host and never writes to it.
//
//	demand.go    usage + contention signals → demand (CPU, memory, I/O)
//	models.go    last value, window max (Autopilot), decaying histogram (VPA)
//	seasonal.go  Holt-Winters, period detection by FFT autocorrelation
//	ars.go       ACI calibration, quantile regression, log-space members,
//	             the envelope cap, the "ars" ensemble and its horizon
//	config.go    Config/New for the agent, NewByName for every model
//	trace.go     Bitbrains / long-CSV trace loading
//	backtest.go  replay, summary, hindsight-margin comparison
//	tracker.go   live prediction error for metrics
package predictor

import (
	"errors"
	"fmt"
	"math"
)

// Forecast is a model's view of the next step (and, for models with a
// horizon, the next H steps) for one series.
type Forecast struct {
	// P50 is the central estimate of demand for the next step.
	P50 float64
	// P95 and P99 are upper quantiles of next-step demand. Models without
	// a notion of spread report their allocation here.
	P95, P99 float64
	// Alloc is the allocation the model recommends: a high quantile of
	// demand, i.e. the estimate plus the model's safety margin.
	Alloc float64
	// Samples is how many observations the model has seen.
	Samples int
	// Horizon is how many entries of Ahead are set: the forecast for the
	// 1st..Horizon-th next sample, each calibrated against the outcome h
	// steps later (Ahead[0] repeats the fields above). 0 for one-step
	// models. An array, so Forecast stays comparable and allocation-free.
	Horizon int
	Ahead   [MaxHorizon]Quantiles
}

// Model is an online forecaster of one series: Observe is called once per
// sample, Forecast whenever an allocation is needed.
type Model interface {
	// Name identifies the model in metrics and backtests.
	Name() string
	// Observe feeds one demand observation (non-negative, finite).
	Observe(v float64) error
	// Forecast returns the current forecast; ok is false before any sample.
	Forecast() (f Forecast, ok bool)
}

// EWMAConfig configures the EWMA model.
type EWMAConfig struct {
	// Alpha is the weight of the newest sample, in (0, 1].
	Alpha float64 `yaml:"alpha"`
	// Margin is the relative safety margin added for the allocation (>= 0).
	Margin float64 `yaml:"margin"`
}

// DefaultEWMAConfig reacts within a few 1 s ticks and keeps 25 % headroom.
func DefaultEWMAConfig() EWMAConfig { return EWMAConfig{Alpha: 0.5, Margin: 0.25} }

// Validate checks the ranges.
func (c EWMAConfig) Validate() error {
	if !(c.Alpha > 0 && c.Alpha <= 1) {
		return fmt.Errorf("predictor: ewma alpha must be in (0, 1], got %v", c.Alpha)
	}
	if !(c.Margin >= 0 && c.Margin <= 10) {
		return fmt.Errorf("predictor: ewma margin must be in [0, 10], got %v", c.Margin)
	}
	return nil
}

// EWMA is an exponentially weighted moving average with a relative margin.
type EWMA struct {
	cfg   EWMAConfig
	value float64
	n     int
}

// NewEWMA returns an EWMA model; cfg must be valid.
func NewEWMA(cfg EWMAConfig) (*EWMA, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &EWMA{cfg: cfg}, nil
}

// Name implements Model.
func (e *EWMA) Name() string { return "ewma" }

// ErrBadSample is returned for negative, NaN or infinite observations.
var ErrBadSample = errors.New("predictor: sample must be finite and non-negative")

func checkSample(v float64) error {
	if math.IsNaN(v) || math.IsInf(v, 0) || v < 0 {
		return fmt.Errorf("%w: %v", ErrBadSample, v)
	}
	return nil
}

// Observe implements Model.
func (e *EWMA) Observe(v float64) error {
	if err := checkSample(v); err != nil {
		return err
	}
	if e.n == 0 {
		e.value = v
	} else {
		e.value = e.cfg.Alpha*v + (1-e.cfg.Alpha)*e.value
	}
	e.n++
	return nil
}

// Forecast implements Model.
func (e *EWMA) Forecast() (Forecast, bool) {
	if e.n == 0 {
		return Forecast{}, false
	}
	a := e.value * (1 + e.cfg.Margin)
	return Forecast{P50: e.value, P95: a, P99: a, Alloc: a, Samples: e.n}, true
}
