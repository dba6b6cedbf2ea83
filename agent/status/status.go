// Package status owns the snapshot the control loop publishes after every
// tick: per VM usage, demand, forecast, allocation and run-queue delay,
// plus counters of actions. The control socket, arsctl and the Prometheus
// collector all read this one type, so they can never disagree.
package status

import (
	"sync"
	"time"
)

// VM is one VM's state after a tick. CPU figures are in millicores.
type VM struct {
	Name  string `json:"name"`
	PID   int    `json:"pid"`
	VCPUs int    `json:"vcpus"`

	UsageMillicores    float64 `json:"usage_millicores"`
	DemandMillicores   float64 `json:"demand_millicores"`
	ForecastMillicores float64 `json:"forecast_millicores"`
	AllocMillicores    int64   `json:"alloc_millicores"`
	FloorMillicores    int64   `json:"floor_millicores"`
	CeilingMillicores  int64   `json:"ceiling_millicores"`
	ThrottledPeriods   uint64  `json:"throttled_periods"`

	// Run-queue delay of the VM's vCPU threads over the last tick, from
	// eBPF; Valid is false when telemetry is off.
	RunqValid      bool    `json:"runq_valid"`
	RunqMeanNs     float64 `json:"runq_mean_ns"`
	RunqP99Ns      float64 `json:"runq_p99_ns"`
	RunqDelayTotal uint64  `json:"runq_delay_total_ns"`

	// Prediction error of the CPU model: |P50 − demand| of the last tick,
	// its mean so far, ticks whose demand exceeded the allocation in
	// force, and an EWMA (≈100 ticks) of that indicator.
	PredErrMillicores float64 `json:"pred_err_millicores"`
	PredMAEMillicores float64 `json:"pred_mae_millicores"`
	Violations        uint64  `json:"violations"`
	RecentViolation   float64 `json:"recent_violation"`

	LastDecision string `json:"last_decision"`
}

// Snapshot is the whole published state.
type Snapshot struct {
	Time       time.Time         `json:"time"`
	Tick       uint64            `json:"tick"`
	VMs        []VM              `json:"vms"`
	Errors     []string          `json:"errors,omitempty"`
	Actions    map[string]uint64 `json:"actions"` // "kind/outcome" → count
	Telemetry  string            `json:"telemetry"`
	Generation uint64            `json:"generation"`
	// Wakeups counts ticks run early on a run-queue delay spike.
	Wakeups uint64 `json:"wakeups"`
	// Drifts counts limits found changed behind ARS's back.
	Drifts uint64 `json:"drifts"`
	// AuditRotated is where arsd moved an audit log that did not verify
	// at start ("" when the chain verified).
	AuditRotated string `json:"audit_rotated,omitempty"`
}

// Board holds the latest snapshot for concurrent readers.
type Board struct {
	mu sync.RWMutex
	s  Snapshot
}

// Publish replaces the snapshot.
func (b *Board) Publish(s Snapshot) {
	b.mu.Lock()
	b.s = s
	b.mu.Unlock()
}

// Latest returns the last snapshot (zero before the first tick). The VMs
// slice and Actions map are copies.
func (b *Board) Latest() Snapshot {
	b.mu.RLock()
	defer b.mu.RUnlock()
	s := b.s
	s.VMs = append([]VM(nil), s.VMs...)
	s.Errors = append([]string(nil), s.Errors...)
	s.Actions = make(map[string]uint64, len(b.s.Actions))
	for k, v := range b.s.Actions {
		s.Actions[k] = v
	}
	return s
}
