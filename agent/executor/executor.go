// Package executor is the one place ARS writes to the host. Every change
// the control loop wants — today the cgroup CPU quota — arrives here as an
// Action; the executor reads the current value, writes only when it
// differs, ignores cgroups that vanished, supports dry-run, and appends an
// audit record for every change it makes (or would make). A reviewer reads
// this package to know what the agent can change.
package executor

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"strconv"
	"time"

	"github.com/ars-dev/ars/agent/cgroups"
)

// CgroupCPU is the narrow cgroup interface the executor needs. The real
// implementation is Cgroups; tests use a fake.
type CgroupCPU interface {
	ReadQuota(g cgroups.Group) (quotaUs int64, periodUs uint64, err error)
	WriteQuota(g cgroups.Group, quotaUs int64) error
}

// Cgroups writes real cgroup files through agent/cgroups.
type Cgroups struct{}

// ReadQuota implements CgroupCPU.
func (Cgroups) ReadQuota(g cgroups.Group) (int64, uint64, error) { return cgroups.ReadQuota(g) }

// WriteQuota implements CgroupCPU.
func (Cgroups) WriteQuota(g cgroups.Group, q int64) error { return cgroups.WriteQuota(g, q) }

// Kind names what an action changes.
type Kind string

// KindCPUQuota sets a VM cgroup's CFS quota from a millicore allocation.
const KindCPUQuota Kind = "cpu.quota"

// Action is one requested change.
type Action struct {
	VM         string
	Kind       Kind
	Group      cgroups.Group
	Millicores int64
	Reason     string
}

// Outcome says what became of an action.
type Outcome string

// Outcomes.
const (
	Applied   Outcome = "applied"   // written
	Unchanged Outcome = "unchanged" // already at the value; nothing written
	DryRun    Outcome = "dry_run"   // would have written
	Vanished  Outcome = "vanished"  // the cgroup is gone (VM exited)
	Failed    Outcome = "failed"
)

// Result reports one action.
type Result struct {
	Action  Action
	Outcome Outcome
	// Before and After are the quota in µs (-1 = unlimited) and the period.
	BeforeQuotaUs, AfterQuotaUs int64
	PeriodUs                    uint64
	Err                         error
}

// Executor applies actions.
type Executor struct {
	cg     CgroupCPU
	audit  *AuditLog
	dryRun bool
	now    func() time.Time
}

// New returns an executor. audit may be nil only in tests.
func New(cg CgroupCPU, audit *AuditLog, dryRun bool, now func() time.Time) *Executor {
	return &Executor{cg: cg, audit: audit, dryRun: dryRun, now: now}
}

// QuotaFor converts millicores to a CFS quota for period (minimum 1 ms,
// the kernel's lower bound).
func QuotaFor(millicores int64, periodUs uint64) int64 {
	q := millicores * int64(periodUs) / 1000
	if q < 1000 {
		q = 1000
	}
	return q
}

// Apply runs the actions in order and returns one result each. It stops
// early only when ctx is done; the remaining actions are reported failed.
func (e *Executor) Apply(ctx context.Context, actions []Action) []Result {
	out := make([]Result, 0, len(actions))
	for _, a := range actions {
		if err := ctx.Err(); err != nil {
			out = append(out, Result{Action: a, Outcome: Failed, Err: fmt.Errorf("executor: %w", err)})
			continue
		}
		out = append(out, e.apply(a))
	}
	return out
}

func (e *Executor) apply(a Action) Result {
	r := Result{Action: a}
	if a.Kind != KindCPUQuota {
		r.Outcome, r.Err = Failed, fmt.Errorf("executor: unknown action kind %q", a.Kind)
		return r
	}
	if a.Millicores <= 0 {
		r.Outcome, r.Err = Failed, fmt.Errorf("executor: %s: refusing non-positive CPU allocation %d", a.VM, a.Millicores)
		return r
	}
	before, period, err := e.cg.ReadQuota(a.Group)
	if err != nil {
		return e.failed(r, err)
	}
	r.BeforeQuotaUs, r.PeriodUs = before, period
	want := QuotaFor(a.Millicores, period)
	r.AfterQuotaUs = want
	if before == want {
		r.Outcome = Unchanged
		return r
	}
	if e.dryRun {
		r.Outcome = DryRun
	} else if err := e.cg.WriteQuota(a.Group, want); err != nil {
		return e.failed(r, err)
	} else {
		r.Outcome = Applied
	}
	if e.audit != nil {
		rec := Record{
			Time: e.now().UTC(), VM: a.VM, Kind: string(a.Kind), Target: a.Group.CPU,
			Before: strconv.FormatInt(before, 10), After: strconv.FormatInt(want, 10),
			Reason: a.Reason, DryRun: e.dryRun,
		}
		if err := e.audit.Append(rec); err != nil {
			// The write happened; the audit failure is reported, not hidden.
			r.Err = fmt.Errorf("executor: audit: %w", err)
		}
	}
	return r
}

func (e *Executor) failed(r Result, err error) Result {
	if errors.Is(err, fs.ErrNotExist) {
		r.Outcome, r.Err = Vanished, nil
		return r
	}
	r.Outcome, r.Err = Failed, fmt.Errorf("executor: %s %s: %w", r.Action.VM, r.Action.Kind, err)
	return r
}
