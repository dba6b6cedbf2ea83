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
	"sync"
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
	// Epoch is the fencing token of the leader that planned the action; an
	// action older than the executor's epoch is refused.
	Epoch uint64
}

// Outcome says what became of an action.
type Outcome string

// Outcomes.
const (
	Applied   Outcome = "applied"     // written
	Unchanged Outcome = "unchanged"   // already at the value; nothing written
	DryRun    Outcome = "dry_run"     // would have written
	Vanished  Outcome = "vanished"    // the cgroup is gone (VM exited)
	Stale     Outcome = "stale_epoch" // planned under an older leader epoch; refused
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
	actor  string

	mu    sync.Mutex
	epoch uint64
}

// New returns an executor. audit may be nil only in tests. actor names
// the writer in audit records (e.g. "arsd[pid]").
func New(cg CgroupCPU, audit *AuditLog, dryRun bool, now func() time.Time, actor string) *Executor {
	return &Executor{cg: cg, audit: audit, dryRun: dryRun, now: now, actor: actor}
}

// SetEpoch raises the executor's epoch (the fencing token); it never
// lowers it. Actions planned under an older epoch are refused from then on.
func (e *Executor) SetEpoch(epoch uint64) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if epoch > e.epoch {
		e.epoch = epoch
	}
}

// Epoch returns the current epoch.
func (e *Executor) Epoch() uint64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.epoch
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
	if cur := e.Epoch(); a.Epoch < cur {
		r.Outcome, r.Err = Stale, fmt.Errorf("executor: %s %s: epoch %d is older than %d; refused", a.VM, a.Kind, a.Epoch, cur)
		e.record(r, "", "") // the refusal error stands; an audit failure adds nothing
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
	if err := e.record(r, strconv.FormatInt(before, 10), strconv.FormatInt(want, 10)); err != nil {
		r.Err = err // the write happened; the audit failure is reported, not hidden
	}
	return r
}

// record appends the audit line of a change or a refusal.
func (e *Executor) record(r Result, before, after string) error {
	if e.audit == nil {
		return nil
	}
	a := r.Action
	rec := Record{
		Time: e.now().UTC(), Actor: e.actor, VM: a.VM, Kind: string(a.Kind), Target: a.Group.CPU,
		Before: before, After: after, Reason: a.Reason, Epoch: a.Epoch, Result: string(r.Outcome),
		DryRun: e.dryRun,
	}
	if err := e.audit.Append(rec); err != nil {
		return fmt.Errorf("executor: audit: %w", err)
	}
	return nil
}

func (e *Executor) failed(r Result, err error) Result {
	if errors.Is(err, fs.ErrNotExist) {
		r.Outcome, r.Err = Vanished, nil
		return r
	}
	r.Outcome, r.Err = Failed, fmt.Errorf("executor: %s %s: %w", r.Action.VM, r.Action.Kind, err)
	return r
}
