package predictor

import (
	"fmt"
	"time"
)

// Config is the predictor's section of the agent configuration.
type Config struct {
	// Model names the model for every VM and resource: "ars" (the
	// calibrated ensemble, default) or any name ModelNames lists.
	Model string `yaml:"model"`
	// TargetViolation is the share of ticks on which demand may exceed the
	// allocation (the SLA's promise), in (0, 0.5).
	TargetViolation float64 `yaml:"targetViolation"`
	// Horizon is how many steps ahead "ars" forecasts (Forecast.Ahead),
	// 1..MaxHorizon; 0 means 1.
	Horizon int `yaml:"horizon"`
	// Alpha and Margin configure the "ewma" model.
	Alpha  float64 `yaml:"alpha"`
	Margin float64 `yaml:"margin"`
}

// DefaultConfig: the calibrated ensemble at a 2 % violation target.
func DefaultConfig() Config {
	e := DefaultEWMAConfig()
	return Config{Model: "ars", TargetViolation: 0.02, Horizon: DefaultHorizon, Alpha: e.Alpha, Margin: e.Margin}
}

// Validate checks the model name and ranges.
func (c Config) Validate() error {
	if !(c.TargetViolation > 0 && c.TargetViolation < 0.5) {
		return fmt.Errorf("predictor: targetViolation must be in (0, 0.5), got %v", c.TargetViolation)
	}
	if c.Horizon < 0 || c.Horizon > MaxHorizon {
		return fmt.Errorf("predictor: horizon must be in [0, %d], got %d", MaxHorizon, c.Horizon)
	}
	if err := (EWMAConfig{Alpha: c.Alpha, Margin: c.Margin}).Validate(); err != nil {
		return err
	}
	if _, err := NewByName(c.Model, c.TargetViolation, time.Second); err != nil {
		return err
	}
	return nil
}

// New returns a fresh model for one VM-resource series sampled every step
// (the agent's tick).
func New(c Config, step time.Duration) (Model, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	switch c.Model {
	case "ewma":
		return NewEWMA(EWMAConfig{Alpha: c.Alpha, Margin: c.Margin})
	case "ars":
		return NewARSHorizon(c.TargetViolation, c.Horizon), nil
	}
	return NewByName(c.Model, c.TargetViolation, step)
}

// ModelNames lists the models NewByName knows: the calibrated ensemble, its
// members calibrated alone, and the uncalibrated baselines.
func ModelNames() []string {
	return []string{"ars", "last-aci", "ewma-aci", "holtwinters-aci", "quantreg-aci", "max-aci", "slow-aci",
		"loglast-aci", "logar-aci", "last", "ewma", "max-1h", "max-6h", "autopilot-p95-12h", "vpa-p90-24h"}
}

// BaselineNames are the operators' recommenders the goal compares against.
func BaselineNames() []string {
	return []string{"last", "max-1h", "max-6h", "autopilot-p95-12h", "vpa-p90-24h"}
}

// NewByName builds a model by name for a series with the given step;
// alpha is the target violation rate (used by calibrated models).
func NewByName(name string, alpha float64, step time.Duration) (Model, error) {
	if step <= 0 {
		return nil, fmt.Errorf("predictor: step must be positive, got %v", step)
	}
	steps := func(d time.Duration) float64 { return float64(d) / float64(step) }
	switch name {
	case "ars":
		return NewARS(alpha), nil
	case "last-aci", "ewma-aci", "holtwinters-aci", "quantreg-aci", "max-aci", "slow-aci", "loglast-aci", "logar-aci":
		return NewCalibrated(name[:len(name)-4], alpha), nil
	case "last":
		return NewLastValue(0), nil
	case "ewma":
		return NewEWMA(DefaultEWMAConfig())
	case "max-1h":
		return NewWindowMax(name, max(1, int(steps(time.Hour)+0.5)), 0), nil
	case "max-6h":
		return NewWindowMax(name, max(1, int(steps(6*time.Hour)+0.5)), 0), nil
	case "autopilot-p95-12h":
		return NewDecayHist(name, 0.95, steps(12*time.Hour), 0), nil
	case "vpa-p90-24h":
		return NewDecayHist(name, 0.90, steps(24*time.Hour), 0.15), nil
	}
	return nil, fmt.Errorf("predictor: unknown model %q (known: %v)", name, ModelNames())
}
