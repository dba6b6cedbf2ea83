// Package synthesizer is the Resource Synthesis Engine (RSE): from each
// VM's SLA, its forecast and its current allocation it decides the VM's next
// allocation. It owns the SLA types, the clamping to floor and ceiling and
// the hysteresis that keeps limits from flapping. It decides only; the
// executor (agent/executor) is the one place that writes.
//
//	synthesizer.go  Engine: the per-VM CPU decision the control loop uses today
//	sla.go          SLA for every resource, priority classes, SLA files
//	capacity.go     host capacity (allocatable = total − reserved)
//	planner.go      Planner: the fleet-wide tick — pool, loans, throttles, Plan
package synthesizer

import (
	"fmt"
	"math"
	"time"

	"github.com/ars-dev/ars/predictor"
)

// CPUSLA bounds a VM's CPU allocation, in millicores (1000 = one core).
type CPUSLA struct {
	FloorMillicores   int64 `yaml:"floorMillicores"`
	CeilingMillicores int64 `yaml:"ceilingMillicores"`
}

// SLA is a VM's service level agreement. Only CPU is mandatory (its floor
// is at least 10 m); a resource whose ceiling is 0 is not managed by the
// Planner (no floor is guaranteed, no limit is set). The zero values of
// the fields added beside CPU keep older configs valid: class standard,
// priority 0, the predictor's violation target, no latency target, no
// topology changes. See sla.go for the per-resource helpers.
type SLA struct {
	CPU     CPUSLA     `yaml:"cpu"`
	Memory  MemorySLA  `yaml:"memory"`
	Disk    DiskSLA    `yaml:"disk"`
	Network NetworkSLA `yaml:"network"`
	// Class is the priority class: critical > standard > best-effort
	// ("" means standard).
	Class Class `yaml:"class"`
	// Priority orders VMs inside a class: higher wins, in [0, 999].
	Priority int `yaml:"priority"`
	// TargetViolation is the share of ticks on which demand may exceed the
	// allocation, in [0, 0.5); 0 means the predictor's default.
	TargetViolation float64 `yaml:"targetViolation"`
	// LatencyTarget is the p99 vCPU run-queue delay the VM should see;
	// 0 means none.
	LatencyTarget time.Duration `yaml:"latencyTargetP99"`
	// AllowTopologyChanges lets the guest see vCPU hotplug and balloon.
	AllowTopologyChanges bool `yaml:"allowTopologyChanges"`
}

// DefaultSLA applies to VMs the config does not name: at least a fifth of
// a core, at most one and a half (one busy TCG vCPU plus QEMU's own threads).
func DefaultSLA() SLA { return SLA{CPU: CPUSLA{FloorMillicores: 200, CeilingMillicores: 1500}} }

// Validate rejects SLAs the engine cannot honour, naming the field.
func (s SLA) Validate() error {
	c := s.CPU
	if c.FloorMillicores < 10 {
		return fmt.Errorf("cpu.floorMillicores must be >= 10, got %d", c.FloorMillicores)
	}
	if c.CeilingMillicores < c.FloorMillicores {
		return fmt.Errorf("cpu.ceilingMillicores (%d) is below cpu.floorMillicores (%d)", c.CeilingMillicores, c.FloorMillicores)
	}
	if c.CeilingMillicores > 1_000_000 {
		return fmt.Errorf("cpu.ceilingMillicores %d is beyond any host (max 1000000)", c.CeilingMillicores)
	}
	return s.validateRest()
}

// Config tunes the engine.
type Config struct {
	// StepMillicores is the allocation granularity.
	StepMillicores int64 `yaml:"stepMillicores"`
	// ShrinkThreshold is the relative drop below the current allocation
	// that must be exceeded before shrinking (hysteresis).
	ShrinkThreshold float64 `yaml:"shrinkThreshold"`
	// MinDwell is the minimum time between a change and a following shrink.
	MinDwell time.Duration `yaml:"minDwell"`
}

// DefaultConfig grows at once and shrinks after 2 s at the earliest, and
// only for drops of more than 10 %.
func DefaultConfig() Config {
	return Config{StepMillicores: 10, ShrinkThreshold: 0.10, MinDwell: 2 * time.Second}
}

// Validate checks ranges.
func (c Config) Validate() error {
	if c.StepMillicores < 1 || c.StepMillicores > 1000 {
		return fmt.Errorf("synthesizer: stepMillicores must be in [1, 1000], got %d", c.StepMillicores)
	}
	if !(c.ShrinkThreshold >= 0 && c.ShrinkThreshold < 1) {
		return fmt.Errorf("synthesizer: shrinkThreshold must be in [0, 1), got %v", c.ShrinkThreshold)
	}
	if c.MinDwell < 0 || c.MinDwell > time.Hour {
		return fmt.Errorf("synthesizer: minDwell must be in [0, 1h], got %v", c.MinDwell)
	}
	return nil
}

// Decision is the engine's answer for one VM and resource.
type Decision struct {
	VM       string
	Resource string
	// Current and Target are allocations; Target == Current means hold.
	Current, Target int64
	// Reason says why, for the audit log.
	Reason string
}

// Changed reports whether the decision asks for a write.
func (d Decision) Changed() bool { return d.Current != d.Target }

// Engine decides allocations. It keeps per-VM dwell state; it is not safe
// for concurrent use (the control loop owns it).
type Engine struct {
	cfg        Config
	now        func() time.Time
	lastChange map[string]time.Time
}

// New returns an engine; now is the clock (time.Now in production).
func New(cfg Config, now func() time.Time) (*Engine, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &Engine{cfg: cfg, now: now, lastChange: map[string]time.Time{}}, nil
}

// CPU decides a VM's CPU allocation in millicores. current <= 0 means the VM
// has no limit yet; the first decision always sets one.
func (e *Engine) CPU(vm string, sla SLA, f predictor.Forecast, current int64) Decision {
	d := Decision{VM: vm, Resource: "cpu", Current: current}
	want := int64(math.Ceil(f.Alloc/float64(e.cfg.StepMillicores))) * e.cfg.StepMillicores
	target := want
	reason := fmt.Sprintf("forecast p50=%.0fm alloc=%.0fm", f.P50, f.Alloc)
	if target < sla.CPU.FloorMillicores {
		target, reason = sla.CPU.FloorMillicores, reason+", raised to SLA floor"
	}
	if target > sla.CPU.CeilingMillicores {
		target, reason = sla.CPU.CeilingMillicores, reason+", capped at SLA ceiling"
	}
	now := e.now()
	switch {
	case current <= 0:
		reason = "first allocation: " + reason
	case target > current:
		reason = "grow: " + reason
	case target < current:
		if float64(current-target) <= e.cfg.ShrinkThreshold*float64(current) &&
			current <= sla.CPU.CeilingMillicores && current >= sla.CPU.FloorMillicores {
			d.Target, d.Reason = current, "hold: drop within hysteresis band"
			return d
		}
		if t, ok := e.lastChange[vm]; ok && now.Sub(t) < e.cfg.MinDwell &&
			current <= sla.CPU.CeilingMillicores {
			d.Target, d.Reason = current, "hold: minimum dwell"
			return d
		}
		reason = "shrink: " + reason
	default:
		d.Target, d.Reason = current, "hold: at target"
		return d
	}
	e.lastChange[vm] = now
	d.Target, d.Reason = target, reason
	return d
}

// Forget drops state for a VM that is gone.
func (e *Engine) Forget(vm string) { delete(e.lastChange, vm) }
