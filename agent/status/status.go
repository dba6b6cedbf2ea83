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

	// Priority class and integer priority from the SLA.
	Class    string `json:"class"`
	Priority int    `json:"priority"`
	// RequiredMillicores is the forecast's requirement clamped to the SLA;
	// Borrowed/Lent are the open loans' sums; ThrottledCPU says the host
	// could not give the requirement this tick (the alert condition).
	RequiredMillicores int64 `json:"required_millicores"`
	BorrowedMillicores int64 `json:"borrowed_millicores"`
	LentMillicores     int64 `json:"lent_millicores"`
	ThrottledCPU       bool  `json:"throttled_cpu"`
	// Memory, in MiB, for VMs whose memory is managed (balloon): what the
	// guest uses, demand, forecast P50, balloon actual, SLA bounds.
	MemUsedMiB     float64 `json:"mem_used_mib,omitempty"`
	MemDemandMiB   float64 `json:"mem_demand_mib,omitempty"`
	MemForecastMiB float64 `json:"mem_forecast_mib,omitempty"`
	MemAllocMiB    int64   `json:"mem_alloc_mib,omitempty"`
	MemFloorMiB    int64   `json:"mem_floor_mib,omitempty"`
	MemCeilingMiB  int64   `json:"mem_ceiling_mib,omitempty"`
	BorrowedMemMiB int64   `json:"borrowed_mem_mib,omitempty"`
	LentMemMiB     int64   `json:"lent_mem_mib,omitempty"`
	ThrottledMem   bool    `json:"throttled_mem,omitempty"`
}

// Loan is an open loan: Borrower holds Amount of Resource (SLA units)
// that Lender, of lower priority, gave up.
type Loan struct {
	Lender   string    `json:"lender"`
	Borrower string    `json:"borrower"`
	Resource string    `json:"resource"`
	Amount   int64     `json:"amount"`
	Since    time.Time `json:"since"`
}

// Capacity is the host's allocatable amount of a resource (0: not
// limited by the host) and the sum of the VMs' allocations after a tick.
type Capacity struct {
	Resource    string `json:"resource"`
	Allocatable int64  `json:"allocatable"`
	Allocated   int64  `json:"allocated"`
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
	// JournalRotated is where arsd moved a DRM journal it could not read
	// at start ("" when it opened).
	JournalRotated string `json:"journal_rotated,omitempty"`
	// Loans open after the tick; Capacity per managed resource.
	Loans    []Loan     `json:"loans,omitempty"`
	Capacity []Capacity `json:"capacity,omitempty"`
	// PlanError says why the plan could not honour the host's capacity
	// ("" when it could).
	PlanError string `json:"plan_error,omitempty"`
	// Throttled counts ticks each "vm/resource" got less than required.
	Throttled map[string]uint64 `json:"throttled,omitempty"`
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
	s.Loans = append([]Loan(nil), s.Loans...)
	s.Capacity = append([]Capacity(nil), s.Capacity...)
	s.Throttled = make(map[string]uint64, len(b.s.Throttled))
	for k, v := range b.s.Throttled {
		s.Throttled[k] = v
	}
	return s
}
