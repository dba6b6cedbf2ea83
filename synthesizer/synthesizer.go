// Package synthesizer is the Resource Synthesis Engine (RSE): from every
// VM's SLA, its forecast and its current allocation, and the host's
// capacity, it decides each VM's next allocation (the Planner). It owns the SLA types, the clamping to floor and ceiling and
// the hysteresis that keeps limits from flapping. It decides only; the
// executor (agent/executor) is the one place that writes.
//
//	synthesizer.go  SLA and Config (the operator's tuning of the Planner)
//	sla.go          SLA for every resource, priority classes, SLA files
//	capacity.go     host capacity (allocatable = total − reserved)
//	planner.go      Planner: the fleet-wide tick — pool, loans, throttles, Plan
package synthesizer

import (
	"fmt"
	"time"
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

// Config tunes the Planner as operators set it (see Planner()).
type Config struct {
	// StepMillicores is the allocation granularity.
	StepMillicores int64 `yaml:"stepMillicores"`
	// ShrinkThreshold is the relative drop below the current allocation
	// that must be exceeded before shrinking (hysteresis).
	ShrinkThreshold float64 `yaml:"shrinkThreshold"`
	// MinDwell is the minimum time between a change and a following shrink.
	MinDwell time.Duration `yaml:"minDwell"`
	// GrowHeadroom: a grow (and a release) goes to the required amount ×
	// (1 + this), so a slowly rising demand does not write every tick.
	GrowHeadroom float64 `yaml:"growHeadroom"`
}

// Planner returns the fleet Planner's configuration for this tuning: the
// CPU step is StepMillicores, the other resources keep their default steps.
func (c Config) Planner() PlannerConfig {
	p := DefaultPlannerConfig()
	p.Step[CPU] = c.StepMillicores
	p.ShrinkThreshold, p.GrowHeadroom, p.MinDwell = c.ShrinkThreshold, c.GrowHeadroom, c.MinDwell
	return p
}

// DefaultConfig grows at once to 5 % above the requirement and shrinks
// after 2 s at the earliest, and only for drops of more than 10 %.
func DefaultConfig() Config {
	return Config{StepMillicores: 10, ShrinkThreshold: 0.10, MinDwell: 2 * time.Second, GrowHeadroom: 0.05}
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
	if !(c.GrowHeadroom >= 0 && c.GrowHeadroom <= 1) {
		return fmt.Errorf("synthesizer: growHeadroom must be in [0, 1], got %v", c.GrowHeadroom)
	}
	return nil
}
