// Package executor is the one place ARS writes to the host. Every change
// the control loop wants arrives here as an Action in a plan; the executor
// is the only caller of the actuators (cgroup files, QMP, tc). For each
// action it reads the current value and writes only when it differs; it
// applies the plan in a safe order (everything that shrinks before
// anything that grows, so the host is never over-committed mid-plan);
// it treats a vanished cgroup or VM as "vanished", not as a failure;
// it refuses actions planned under an older leader epoch (fencing); it
// supports dry-run; and it appends a hash-chained audit record for every
// change or refusal. A reviewer reads this package to know what the agent
// can change.
package executor

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/ars-dev/ars/agent/actuator/qmpact"
	"github.com/ars-dev/ars/agent/actuator/tc"
	"github.com/ars-dev/ars/agent/cgroups"
	"github.com/ars-dev/ars/mapper"
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

// Actuators are what the executor drives. Any may be nil; an action that
// needs a missing one fails with a clear error.
type Actuators struct {
	CPU CgroupCPU
	// QMP returns the control of a VM's QEMU (qmpact.Controller in
	// production, qmpact.Fake in tests).
	QMP func(vm string) (qmpact.VMControl, error)
	// TC shapes tap devices (tc.Netlink in production, tc.Fake in tests).
	TC tc.Shaper
}

// Journal makes intents durable before the executor acts and records
// their outcomes after (mapper.Journal).
type Journal interface {
	Intents(es []mapper.Entry) ([]uint64, error)
	Outcomes(cs []mapper.Completion) error
}

// ErrVanished is returned by a QMP resolver for a VM that is gone.
var ErrVanished = errors.New("executor: VM vanished")

// Kind names what an action changes.
type Kind string

// The kinds of action.
const (
	// KindCPUQuota sets a VM cgroup's CFS quota from Millicores.
	KindCPUQuota Kind = "cpu.quota"
	// KindBalloon sets the balloon target (guest memory size) to Bytes.
	KindBalloon Kind = "mem.balloon"
	// KindNetEgress shapes the tap's egress (the VM's download) to BitsPerSec.
	KindNetEgress Kind = "net.egress"
	// KindNetIngress shapes the tap's ingress (the VM's upload) to BitsPerSec.
	KindNetIngress Kind = "net.ingress"
	// KindBlockThrottle sets a drive's I/O limits to Throttle.
	KindBlockThrottle Kind = "disk.throttle"
)

// Action is one requested change. Which fields matter depends on Kind.
type Action struct {
	VM     string
	Kind   Kind
	Reason string
	// Epoch is the fencing token of the leader that planned the action; an
	// action older than the executor's epoch is refused.
	Epoch uint64

	Group      cgroups.Group   // cpu.quota
	Millicores int64           // cpu.quota
	Bytes      uint64          // mem.balloon
	Link       string          // net.*: the tap
	BitsPerSec uint64          // net.*
	Drive      string          // disk.throttle
	Throttle   qmpact.Throttle // disk.throttle
}

// Outcome says what became of an action.
type Outcome string

// Outcomes.
const (
	Applied   Outcome = "applied"     // written
	Unchanged Outcome = "unchanged"   // already at the value; nothing written
	DryRun    Outcome = "dry_run"     // would have written
	Vanished  Outcome = "vanished"    // the cgroup or VM is gone
	Stale     Outcome = "stale_epoch" // planned under an older leader epoch; refused
	Failed    Outcome = "failed"
)

// Result reports one action, with the values before and after as text
// (quota in µs, bytes, bits/s, or the throttle).
type Result struct {
	Action        Action
	Outcome       Outcome
	Before, After string
	Err           error
}

// Executor applies plans. Apply calls are serialized.
type Executor struct {
	act     Actuators
	audit   *AuditLog
	journal Journal
	fence   Fence
	dryRun  bool
	now     func() time.Time
	actor   string

	apply sync.Mutex // one plan at a time
	mu    sync.Mutex
	epoch uint64
}

// New returns an executor. audit may be nil only in tests. actor names
// the writer in audit records (e.g. "arsd[pid]").
func New(act Actuators, audit *AuditLog, dryRun bool, now func() time.Time, actor string) *Executor {
	return &Executor{act: act, audit: audit, dryRun: dryRun, now: now, actor: actor}
}

// WithJournal makes the executor journal every write as an intent (one
// durable transaction per plan) before making it and its outcome after.
// If the intents cannot be made durable, nothing is written.
func (e *Executor) WithJournal(j Journal) *Executor {
	e.journal = j
	return e
}

// Fence confirms, just before a write, that this agent still leads: it
// returns nil, or the newer epoch that superseded it (see agent/lease).
type Fence func(ctx context.Context) (newer uint64, err error)

// WithFence makes the executor ask fence before every write; a write
// whose epoch fence reports superseded is refused as stale (and audited),
// and the executor's epoch is raised to the newer one.
func (e *Executor) WithFence(f Fence) *Executor {
	e.fence = f
	return e
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

// step is one action after reading its current value.
type step struct {
	i             int
	a             Action
	before, after string
	dir           int // -1 shrinks, +1 grows, 0 unchanged
	write         func(ctx context.Context) error
	res           *Result
}

// order ranks kinds inside the shrink and grow phases. Memory: inflate the
// balloon before lowering a memory limit; raise a limit before deflating.
var shrinkRank = map[Kind]int{KindBalloon: 0, KindCPUQuota: 1, KindBlockThrottle: 1, KindNetEgress: 1, KindNetIngress: 1}
var growRank = map[Kind]int{KindCPUQuota: 0, KindBlockThrottle: 0, KindNetEgress: 0, KindNetIngress: 0, KindBalloon: 1}

// Apply runs a plan and returns one result per action, in the plan's
// order. It reads every action's current value first, then writes the
// shrinking ones, then the growing ones (stable within each phase). When
// ctx ends, the actions not yet written are reported failed.
func (e *Executor) Apply(ctx context.Context, plan []Action) []Result {
	e.apply.Lock()
	defer e.apply.Unlock()
	out := make([]Result, len(plan))
	var shrink, grow []*step
	cur := e.Epoch()
	for i, a := range plan {
		out[i] = Result{Action: a}
		r := &out[i]
		if a.Epoch < cur {
			r.Outcome, r.Err = Stale, fmt.Errorf("executor: %s %s: epoch %d is older than %d; refused", a.VM, a.Kind, a.Epoch, cur)
			e.record(r) // the refusal error stands; an audit failure adds nothing
			continue
		}
		if err := ctx.Err(); err != nil {
			r.Outcome, r.Err = Failed, fmt.Errorf("executor: %w", err)
			continue
		}
		s, err := e.prepare(ctx, a)
		if err != nil {
			e.fail(r, err)
			continue
		}
		s.i, s.res = i, r
		r.Before, r.After = s.before, s.after
		switch {
		case s.dir == 0:
			r.Outcome = Unchanged
		case s.dir < 0:
			shrink = append(shrink, s)
		default:
			grow = append(grow, s)
		}
	}
	sort.SliceStable(shrink, func(i, j int) bool { return shrinkRank[shrink[i].a.Kind] < shrinkRank[shrink[j].a.Kind] })
	sort.SliceStable(grow, func(i, j int) bool { return growRank[grow[i].a.Kind] < growRank[grow[j].a.Kind] })
	writes := append(shrink, grow...)
	var seqs []uint64
	if e.journal != nil && !e.dryRun && len(writes) > 0 {
		entries := make([]mapper.Entry, len(writes))
		for i, s := range writes {
			entries[i] = mapper.Entry{Time: e.now().UTC(), Epoch: s.a.Epoch, VM: s.a.VM, Kind: string(s.a.Kind),
				Target: target(s.a), Value: s.after, Reason: s.a.Reason}
		}
		var err error
		if seqs, err = e.journal.Intents(entries); err != nil {
			for _, s := range writes {
				s.res.Outcome, s.res.Err = Failed, fmt.Errorf("executor: not acting, intent not durable: %w", err)
			}
			return out
		}
	}
	for _, s := range writes {
		r := s.res
		if err := ctx.Err(); err != nil {
			r.Outcome, r.Err = Failed, fmt.Errorf("executor: %w", err)
			continue
		}
		if e.fence != nil && !e.dryRun {
			if newer, err := e.fence(ctx); err != nil {
				e.SetEpoch(newer)
				if cur := e.Epoch(); s.a.Epoch < cur {
					r.Outcome, r.Err = Stale, fmt.Errorf("executor: %s %s: epoch %d superseded by %d: %w; refused", s.a.VM, s.a.Kind, s.a.Epoch, cur, err)
				} else {
					r.Outcome, r.Err = Failed, fmt.Errorf("executor: %s %s: leadership not confirmed: %w", s.a.VM, s.a.Kind, err)
				}
				e.record(r)
				continue
			}
		}
		if e.dryRun {
			r.Outcome = DryRun
		} else if err := s.write(ctx); err != nil {
			e.fail(r, err)
			continue
		} else {
			r.Outcome = Applied
		}
		if err := e.record(r); err != nil {
			r.Err = err // the write happened; the audit failure is reported, not hidden
		}
	}
	if seqs != nil {
		cs := make([]mapper.Completion, len(writes))
		for i, s := range writes {
			detail := ""
			if s.res.Err != nil {
				detail = s.res.Err.Error()
			}
			cs[i] = mapper.Completion{Seq: seqs[i], Outcome: string(s.res.Outcome), Detail: detail, At: e.now().UTC()}
		}
		if err := e.journal.Outcomes(cs); err != nil {
			for _, s := range writes {
				if s.res.Err == nil {
					s.res.Err = fmt.Errorf("executor: journal outcome: %w", err)
				}
			}
		}
	}
	if e.audit != nil {
		if err := e.audit.Sync(); err != nil {
			for i := range out {
				if out[i].Outcome == Applied || out[i].Outcome == DryRun || out[i].Outcome == Stale {
					if out[i].Err == nil {
						out[i].Err = fmt.Errorf("executor: %w", err)
					}
				}
			}
		}
	}
	return out
}

func cmp64(before, after uint64) int {
	switch {
	case after < before:
		return -1
	case after > before:
		return 1
	}
	return 0
}

// prepare validates an action, reads the current value and returns the
// write to make.
func (e *Executor) prepare(ctx context.Context, a Action) (*step, error) {
	s := &step{a: a}
	switch a.Kind {
	case KindCPUQuota:
		if e.act.CPU == nil {
			return nil, errors.New("no cgroup actuator")
		}
		if a.Millicores <= 0 {
			return nil, fmt.Errorf("refusing non-positive CPU allocation %d", a.Millicores)
		}
		before, period, err := e.act.CPU.ReadQuota(a.Group)
		if err != nil {
			return nil, err
		}
		want := QuotaFor(a.Millicores, period)
		s.before, s.after = strconv.FormatInt(before, 10), strconv.FormatInt(want, 10)
		switch {
		case before == want:
		case before < 0 || want < before: // from unlimited, or lower: shrinks
			s.dir = -1
		default:
			s.dir = 1
		}
		s.write = func(context.Context) error { return e.act.CPU.WriteQuota(a.Group, want) }
	case KindBalloon:
		vc, err := e.qmp(a.VM)
		if err != nil {
			return nil, err
		}
		if a.Bytes == 0 {
			return nil, errors.New("refusing a zero balloon target")
		}
		before, err := vc.BalloonActual(ctx)
		if err != nil {
			return nil, err
		}
		s.before, s.after = strconv.FormatUint(before, 10), strconv.FormatUint(a.Bytes, 10)
		s.dir = cmp64(before, a.Bytes)
		s.write = func(ctx context.Context) error { return vc.Balloon(ctx, a.Bytes) }
	case KindNetEgress, KindNetIngress:
		if e.act.TC == nil {
			return nil, errors.New("no tc actuator")
		}
		if a.BitsPerSec == 0 {
			return nil, errors.New("refusing a zero rate (use a removal, not a rate of 0)")
		}
		rates, err := e.act.TC.Get(ctx, a.Link)
		if err != nil {
			return nil, err
		}
		before, set := rates.EgressBitsPerSec, e.act.TC.SetEgress
		if a.Kind == KindNetIngress {
			before, set = rates.IngressBitsPerSec, e.act.TC.SetIngress
		}
		s.before, s.after = strconv.FormatUint(before, 10), strconv.FormatUint(a.BitsPerSec, 10)
		if before == 0 { // unshaped: the first limit tightens
			s.dir = -1
		} else {
			s.dir = cmp64(before, a.BitsPerSec)
		}
		s.write = func(ctx context.Context) error { _, err := set(ctx, a.Link, a.BitsPerSec); return err }
	case KindBlockThrottle:
		vc, err := e.qmp(a.VM)
		if err != nil {
			return nil, err
		}
		t := a.Throttle
		if t.BPS < 0 || t.BPSRead < 0 || t.BPSWrite < 0 || t.IOPS < 0 || t.IOPSRead < 0 || t.IOPSWrite < 0 {
			return nil, fmt.Errorf("refusing negative I/O limits %+v", t)
		}
		before, err := vc.BlockThrottle(ctx, a.Drive)
		if err != nil {
			return nil, err
		}
		s.before, s.after = fmt.Sprintf("%+v", before), fmt.Sprintf("%+v", t)
		if before != t {
			s.dir = throttleDir(before, t)
		}
		s.write = func(ctx context.Context) error { return vc.SetBlockThrottle(ctx, a.Drive, t) }
	default:
		return nil, fmt.Errorf("unknown action kind %q", a.Kind)
	}
	return s, nil
}

// throttleDir: a throttle that sets a limit where there was none, or
// lowers one, shrinks the VM; otherwise it grows.
func throttleDir(before, after qmpact.Throttle) int {
	lim := func(v int64) uint64 { // 0 = unlimited
		if v == 0 {
			return ^uint64(0)
		}
		return uint64(v)
	}
	b := []int64{before.BPS, before.BPSRead, before.BPSWrite, before.IOPS, before.IOPSRead, before.IOPSWrite}
	a := []int64{after.BPS, after.BPSRead, after.BPSWrite, after.IOPS, after.IOPSRead, after.IOPSWrite}
	for i := range a {
		if lim(a[i]) < lim(b[i]) {
			return -1
		}
	}
	return 1
}

func (e *Executor) qmp(vm string) (qmpact.VMControl, error) {
	if e.act.QMP == nil {
		return nil, errors.New("no QMP actuator")
	}
	return e.act.QMP(vm)
}

func (e *Executor) fail(r *Result, err error) {
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, ErrVanished) || errors.Is(err, qmpact.ErrVMGone) || errors.Is(err, tc.ErrNoLink) {
		r.Outcome, r.Err = Vanished, nil
		return
	}
	r.Outcome, r.Err = Failed, fmt.Errorf("executor: %s %s: %w", r.Action.VM, r.Action.Kind, err)
}

// target names what an action writes, for the audit record.
func target(a Action) string {
	switch a.Kind {
	case KindCPUQuota:
		return a.Group.CPU
	case KindNetEgress, KindNetIngress:
		return "tap:" + a.Link
	case KindBlockThrottle:
		return "qmp:" + a.VM + ":" + a.Drive
	}
	return "qmp:" + a.VM
}

// record appends the audit line of a change or a refusal.
func (e *Executor) record(r *Result) error {
	if e.audit == nil {
		return nil
	}
	a := r.Action
	rec := Record{
		Time: e.now().UTC(), Actor: e.actor, VM: a.VM, Kind: string(a.Kind), Target: target(a),
		Before: r.Before, After: r.After, Reason: a.Reason, Epoch: a.Epoch, Result: string(r.Outcome),
		DryRun: e.dryRun,
	}
	if err := e.audit.Append(rec); err != nil {
		return fmt.Errorf("executor: audit: %w", err)
	}
	return nil
}
