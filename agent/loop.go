// Package agent wires ARS's control loop on one host: every tick it asks
// discovery which VMs run, reads their cgroup CPU accounting, eBPF
// run-queue delay and (for balloon-managed VMs) guest memory statistics,
// feeds demand to the predictor, lets the synthesizer's Planner share the
// host's capacity out (loans, throttles), hands the changes to the
// executor (the one writer), records the mapping and loans in the DRM and
// publishes a status snapshot. It also holds the SLAs in force (SLAStore)
// and reads the host's capacity. The sub-packages hold the parts (cgroups,
// config, discovery, executor, metrics, qmp, status, telemetry, ...); this
// package only connects them.
package agent

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"sort"
	"strconv"
	"time"

	"github.com/ars-dev/ars/agent/actuator/qmpact"
	"github.com/ars-dev/ars/agent/cgroups"
	"github.com/ars-dev/ars/agent/config"
	"github.com/ars-dev/ars/agent/executor"
	"github.com/ars-dev/ars/agent/status"
	"github.com/ars-dev/ars/agent/telemetry"
	"github.com/ars-dev/ars/mapper"
	"github.com/ars-dev/ars/predictor"
	"github.com/ars-dev/ars/synthesizer"
)

// VM is what discovery tells the loop about one running VM.
type VM struct {
	Name   string
	Socket string
	PID    int
	VCPUs  []mapper.VCPU
	Group  cgroups.Group
}

// VMSource lists the running VMs (agent/discovery in production).
type VMSource interface {
	Refresh(ctx context.Context) ([]VM, []error)
}

// RunqSource is the eBPF run-queue delay program (telemetry.Runqlat).
type RunqSource interface {
	Track(tid, vmSlot, vcpuSlot uint32) error
	Untrack(tid uint32) error
	Read() (map[uint32]telemetry.VCPUStats, error)
}

// CPUReader reads cgroup CPU accounting (cgroups.ReadCPU in production).
type CPUReader func(g cgroups.Group) (cgroups.CPUStat, error)

// Exec applies actions (executor.Executor).
type Exec interface {
	Apply(ctx context.Context, actions []executor.Action) []executor.Result
}

// Deps are the loop's collaborators; Runq may be nil (telemetry off).
type Deps struct {
	VMs     VMSource
	Runq    RunqSource
	ReadCPU CPUReader
	Exec    Exec
	DRM     *mapper.Table
	Board   *status.Board
	Log     *slog.Logger
	Now     func() time.Time
	// Epoch is the leader epoch stamped on every action (fencing token).
	Epoch uint64
	// Audit, when not nil, records events that are not executor actions
	// (drift found on the host).
	Audit func(executor.Record) error
	// AuditRotated is where an unverifiable audit log was moved at start
	// ("" if it verified); published for the metrics.
	AuditRotated string
	// JournalRotated is where an unreadable DRM journal was moved at start
	// ("" if it opened); published for the metrics.
	JournalRotated string
	// Wake, when not nil, runs a tick early (telemetry spikes); wake-ups
	// closer than MinWakeInterval to the last tick are deferred to it.
	Wake <-chan struct{}
	// SLAs holds the SLAs in force (nil: the config's, fixed).
	SLAs *SLAStore
	// QMP, when not nil, reaches a VM's QEMU to read its balloon and guest
	// memory statistics (memory is managed only with it).
	QMP func(vm string) (qmpact.VMControl, error)
	// Capacity is the host's allocatable capacity the Planner shares out
	// (zero Total: that resource is not limited by the host).
	Capacity synthesizer.Capacity
}

// MinWakeInterval bounds how often early wake-ups can tick.
const MinWakeInterval = 200 * time.Millisecond

// VMTracker is implemented by telemetry that also follows whole VMs (page
// faults and block I/O of the QEMU process, tap counters).
type VMTracker interface {
	TrackVM(vmSlot uint32, vm telemetry.VMRef) error
	UntrackVM(vmSlot uint32) error
}

type vmState struct {
	slot     uint32
	model    predictor.Model
	prevCPU  cgroups.CPUStat
	prevAt   time.Time
	havePrev bool
	tids     map[uint32]bool
	prevRunq map[uint32]telemetry.VCPUStats
	last     status.VM
	// forecast is the model's last forecast, judged against the next
	// tick's demand by tracker (prediction error metrics).
	forecast     predictor.Forecast
	haveForecast bool
	tracker      predictor.Tracker
	// applied is the quota read back after the last tick; a different
	// value at the next tick was written by someone else (drift).
	applied     int64
	haveApplied bool
	drift       string // this tick's drift, for the decision's reason
	// adopted: the VM had a limit when first seen (e.g. arsd restarted);
	// it is kept, not shrunk, until the model has warmed up.
	adopted bool
	// cur is the allocation in force as read this tick (CPU millicores,
	// 0 = unlimited; memory MiB from the balloon), required what the
	// forecast asks for (−1: unknown, hold).
	cur, required [synthesizer.NumResources]int64
	mem           memState
	sla           synthesizer.SLA // as planned this tick (unmanaged parts zeroed)
	driftFrom     int64           // the quota ARS expected before this tick's drift
	hold          string          // why a shrink is held (restart adoption)
	forecastNote  string
	throttled     [synthesizer.NumResources]bool
}

// WarmupSamples is how many samples a new model needs before ARS shrinks
// an allocation it found in place (so a restart changes no VM's limit).
const WarmupSamples = 30

// Loop is the control loop. It is driven by one goroutine (Run or Tick).
type Loop struct {
	cfg     config.Config
	d       Deps
	planner *synthesizer.Planner
	vms     map[string]*vmState
	// loans are the open loans after the last plan, to audit new and
	// returned ones; throttled counts VM-resource ticks short of need.
	loans          map[loanKey]synthesizer.Loan
	throttled      map[string]uint64
	planErr        string
	nextSlot       uint32
	tick           uint64
	actions        map[string]uint64
	wakeups        uint64
	drifts         uint64
	telemetryState string
}

// New builds a loop; telemetryState describes the eBPF layer for status
// ("runqlat" or why it is off).
func New(cfg config.Config, d Deps, telemetryState string) (*Loop, error) {
	pl, err := synthesizer.NewPlanner(cfg.Synthesizer.Planner(), d.Now)
	if err != nil {
		return nil, err
	}
	if d.SLAs == nil {
		if d.SLAs, err = NewSLAStore(cfg.DefaultSLA, cfg.VMs, synthesizer.Capacity{}, ""); err != nil {
			return nil, err
		}
	}
	return &Loop{cfg: cfg, d: d, planner: pl, vms: map[string]*vmState{},
		loans: map[loanKey]synthesizer.Loan{}, throttled: map[string]uint64{},
		actions: map[string]uint64{}, telemetryState: telemetryState}, nil
}

// Run ticks every cfg.Tick, and early on a wake-up, until ctx is done.
func (l *Loop) Run(ctx context.Context) error {
	t := time.NewTicker(l.cfg.Tick)
	defer t.Stop()
	for {
		l.Tick(ctx)
		last := l.d.Now()
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		case <-l.d.Wake:
			l.wakeups++
			if d := MinWakeInterval - l.d.Now().Sub(last); d > 0 {
				select {
				case <-ctx.Done():
					return nil
				case <-time.After(d):
				}
			}
		}
	}
}

// Tick runs one control step: observe every VM, plan the whole host with
// the Planner, apply the plan through the executor, record the result.
func (l *Loop) Tick(ctx context.Context) {
	l.tick++
	var errs []string
	found, derrs := l.d.VMs.Refresh(ctx)
	for _, e := range derrs {
		errs = append(errs, e.Error())
	}
	seen := map[string]bool{}
	for _, vm := range found {
		seen[vm.Name] = true
	}
	for name := range l.vms {
		if !seen[name] {
			l.forget(name)
		}
	}

	var runq map[uint32]telemetry.VCPUStats
	if l.d.Runq != nil {
		var err error
		if runq, err = l.d.Runq.Read(); err != nil {
			errs = append(errs, err.Error())
		}
	}

	var live []VM
	var inputs []synthesizer.VMInput
	for _, vm := range found {
		st, err := l.observe(vm, runq)
		if err != nil {
			errs = append(errs, fmt.Sprintf("%s: %v", vm.Name, err))
			continue
		}
		if err := l.observeMem(ctx, vm, st); err != nil {
			errs = append(errs, fmt.Sprintf("%s: memory: %v", vm.Name, err))
		}
		live = append(live, vm)
		inputs = append(inputs, l.input(vm, st))
	}

	plan, err := l.plan(inputs)
	if err != nil {
		errs = append(errs, err.Error())
	}
	var actions []executor.Action
	if plan != nil {
		actions = l.actionsFor(live, plan)
	}

	for _, r := range l.d.Exec.Apply(ctx, actions) {
		l.actions[string(r.Action.Kind)+"/"+string(r.Outcome)]++
		if r.Err != nil {
			errs = append(errs, r.Err.Error())
			l.d.Log.Error("action failed", "vm", r.Action.VM, "kind", r.Action.Kind, "err", r.Err)
			continue
		}
		if r.Outcome == executor.Applied || r.Outcome == executor.DryRun {
			l.d.Log.Info("limit changed", "vm", r.Action.VM, "kind", r.Action.Kind, "outcome", r.Outcome,
				"before", r.Before, "after", r.After, "reason", r.Action.Reason)
		}
		// What ARS wrote is what it expects to find next tick. It is taken
		// from the write itself, never read back from the kernel later: a
		// change by someone else between the write and a read-back would
		// otherwise be taken for ours and never seen as drift.
		if st, ok := l.vms[r.Action.VM]; ok && r.Outcome == executor.Applied && r.Action.Kind == executor.KindCPUQuota {
			if q, err := strconv.ParseInt(r.After, 10, 64); err == nil {
				st.applied = q
			}
		}
		if st, ok := l.vms[r.Action.VM]; ok && r.Outcome == executor.Applied && r.Action.Kind == executor.KindBalloon {
			st.mem.targetMiB = int64(r.Action.Bytes >> 20)
			st.mem.changedAt = l.d.Now()
		}
	}
	if plan != nil {
		l.recordPlan(plan)
	}

	// Record what is in force now, read back from the kernel.
	snap := status.Snapshot{Time: l.d.Now(), Tick: l.tick, Telemetry: l.telemetryState, Errors: errs}
	for _, vm := range live {
		st := l.vms[vm.Name]
		cpu := mapper.CPU{Cgroup: vm.Group.CPU, Version: vm.Group.CPUVersion.String()}
		if cs, err := l.d.ReadCPU(vm.Group); err == nil {
			q, p := cs.QuotaUs, cs.PeriodUs
			cpu.QuotaUs, cpu.PeriodUs = q, p
			if q > 0 && p > 0 {
				cpu.Millicores = q * 1000 / int64(p)
			}
		} else {
			cpu.QuotaUs = st.prevCPU.QuotaUs
			cpu.PeriodUs = st.prevCPU.PeriodUs
		}
		row := mapper.VM{Name: vm.Name, PID: vm.PID, QMP: vm.Socket, VCPUs: vm.VCPUs, CPU: cpu}
		if st.mem.valid {
			row.Mem = &mapper.Mem{BalloonMiB: st.mem.actualMiB,
				TargetMiB: st.mem.targetMiB, MaxMiB: st.mem.maxMiB, UsedMiB: int64(st.mem.usedMiB)}
		}
		l.d.DRM.Put(row)
		st.last.AllocMillicores = cpu.Millicores
		snap.VMs = append(snap.VMs, st.last)
	}
	sort.Slice(snap.VMs, func(i, j int) bool { return snap.VMs[i].Name < snap.VMs[j].Name })
	l.d.DRM.SetLoans(mapperLoans(l.planner.Loans()))
	snap.Loans = statusLoans(l.planner.Loans())
	snap.Capacity = l.capacityStatus(plan)
	snap.PlanError = l.planErr
	snap.Throttled = make(map[string]uint64, len(l.throttled))
	for k, v := range l.throttled {
		snap.Throttled[k] = v
	}
	snap.Actions = make(map[string]uint64, len(l.actions))
	for k, v := range l.actions {
		snap.Actions[k] = v
	}
	snap.Generation = l.d.DRM.Snapshot().Generation
	snap.Wakeups = l.wakeups
	snap.Drifts = l.drifts
	snap.AuditRotated = l.d.AuditRotated
	snap.JournalRotated = l.d.JournalRotated
	l.d.Board.Publish(snap)
}

// observe updates a VM's telemetry state and model; it returns the state.
func (l *Loop) observe(vm VM, runq map[uint32]telemetry.VCPUStats) (*vmState, error) {
	st, ok := l.vms[vm.Name]
	if !ok {
		m, err := predictor.New(l.cfg.Predictor, l.cfg.Tick)
		if err != nil {
			return nil, err
		}
		st = &vmState{slot: l.nextSlot, model: m, tids: map[uint32]bool{}, prevRunq: map[uint32]telemetry.VCPUStats{}}
		l.nextSlot++
		l.vms[vm.Name] = st
		if t, ok := l.d.Runq.(VMTracker); ok && l.d.Runq != nil {
			if err := t.TrackVM(st.slot, telemetry.VMRef{Name: vm.Name, PID: vm.PID}); err != nil {
				l.d.Log.Warn("track vm", "vm", vm.Name, "err", err)
			}
		}
		l.d.Log.Info("vm discovered", "vm", vm.Name, "pid", vm.PID, "vcpus", len(vm.VCPUs), "cgroup", vm.Group.CPU)
	}
	sla, _ := l.d.SLAs.For(vm.Name)
	st.last = status.VM{Name: vm.Name, PID: vm.PID, VCPUs: len(vm.VCPUs),
		FloorMillicores: sla.CPU.FloorMillicores, CeilingMillicores: sla.CPU.CeilingMillicores,
		LastDecision: st.last.LastDecision}

	l.trackVCPUs(vm, st)
	if l.d.Runq != nil && runq != nil {
		l.runqDelay(st, runq)
	}

	cur, err := l.d.ReadCPU(vm.Group)
	if err != nil {
		return nil, fmt.Errorf("read cpu accounting: %w", err)
	}
	st.drift = ""
	if !st.havePrev && cur.QuotaUs > 0 {
		st.adopted = true
	}
	switch {
	case !st.haveApplied:
		// First sight: what is in place is what we expect from now on.
		st.applied, st.haveApplied = cur.QuotaUs, true
	case cur.QuotaUs != st.applied:
		l.onDrift(vm, st, cur.QuotaUs)
	}
	now := l.d.Now()
	prev, prevAt, had := st.prevCPU, st.prevAt, st.havePrev
	st.prevCPU, st.prevAt, st.havePrev = cur, now, true
	if !had || !now.After(prevAt) || cur.UsageNs < prev.UsageNs {
		return st, nil // first sight (or a counter reset): no rate yet
	}
	dt := now.Sub(prevAt).Seconds()
	usage := float64(cur.UsageNs-prev.UsageNs) / 1e6 / dt // ms of CPU per s = millicores
	obs := predictor.CPUObservation{UsageMillicores: usage}
	if prev.QuotaUs > 0 && prev.PeriodUs > 0 {
		obs.LimitMillicores = float64(prev.QuotaUs) * 1000 / float64(prev.PeriodUs)
	}
	if cur.Periods >= prev.Periods && cur.Throttled >= prev.Throttled {
		obs.Periods, obs.ThrottledPeriods = cur.Periods-prev.Periods, cur.Throttled-prev.Throttled
	}
	demand := predictor.CPUDemand(obs)
	if st.haveForecast {
		// Judge last tick's forecast: its P50 against this demand, and the
		// allocation actually in force (unlimited never violates).
		alloc := math.Inf(1)
		if obs.LimitMillicores > 0 {
			alloc = obs.LimitMillicores
		}
		st.tracker.Record(predictor.Forecast{P50: st.forecast.P50, Alloc: alloc}, demand)
		st.last.PredErrMillicores = math.Abs(st.forecast.P50 - demand)
	}
	st.last.PredMAEMillicores = st.tracker.MAE()
	st.last.Violations = st.tracker.Violations
	st.last.RecentViolation = st.tracker.RecentViolation
	if err := st.model.Observe(demand); err != nil {
		return nil, err
	}
	st.last.UsageMillicores, st.last.DemandMillicores, st.last.ThrottledPeriods = usage, demand, obs.ThrottledPeriods
	return st, nil
}

// trackVCPUs registers the VM's vCPU threads with eBPF (new ones only).
func (l *Loop) trackVCPUs(vm VM, st *vmState) {
	if l.d.Runq == nil {
		return
	}
	want := map[uint32]bool{}
	for _, c := range vm.VCPUs {
		tid := uint32(c.TID)
		want[tid] = true
		if st.tids[tid] {
			continue
		}
		if err := l.d.Runq.Track(tid, st.slot, uint32(c.Index)); err != nil {
			l.d.Log.Warn("track vcpu", "vm", vm.Name, "tid", tid, "err", err)
			continue
		}
		st.tids[tid] = true
	}
	for tid := range st.tids {
		if !want[tid] {
			l.d.Runq.Untrack(tid)
			delete(st.tids, tid)
			delete(st.prevRunq, tid)
		}
	}
}

// runqDelay folds this tick's change of every vCPU's counters into the
// VM's mean and p99 run-queue delay.
func (l *Loop) runqDelay(st *vmState, runq map[uint32]telemetry.VCPUStats) {
	var sum telemetry.VCPUStats
	any := false
	for tid := range st.tids {
		cur, ok := runq[tid]
		if !ok {
			continue
		}
		if prev, ok := st.prevRunq[tid]; ok {
			sum = sum.Add(cur.Sub(prev))
			any = true
		}
		st.prevRunq[tid] = cur
	}
	if !any {
		return
	}
	st.last.RunqValid = true
	st.last.RunqDelayTotal = sum.RunDelayNs
	if sum.Count > 0 {
		st.last.RunqMeanNs = float64(sum.RunDelayNs) / float64(sum.Count)
		st.last.RunqP99Ns = sum.Quantile(0.99)
	}
}

func (l *Loop) forget(name string) {
	st := l.vms[name]
	if l.d.Runq != nil {
		for tid := range st.tids {
			l.d.Runq.Untrack(tid)
		}
		if t, ok := l.d.Runq.(VMTracker); ok {
			t.UntrackVM(st.slot)
		}
	}
	l.planner.Forget(name)
	l.d.DRM.Remove(name)
	delete(l.vms, name)
	l.d.Log.Info("vm gone", "vm", name)
}

// onDrift handles a quota that changed since the last tick without ARS:
// it is logged, audited and, by policy, repaired this tick or adopted.
func (l *Loop) onDrift(vm VM, st *vmState, found int64) {
	l.drifts++
	st.drift = fmt.Sprintf("drift: quota %d µs found, %d µs expected", found, st.applied)
	l.d.Log.Warn("cpu quota changed behind ARS's back", "vm", vm.Name, "found_us", found,
		"expected_us", st.applied, "policy", l.cfg.DriftPolicy)
	if l.d.Audit != nil {
		if err := l.d.Audit(executor.Record{Time: l.d.Now().UTC(), Actor: "arsd", VM: vm.Name,
			Kind: "drift." + string(executor.KindCPUQuota), Target: vm.Group.CPU,
			Before: strconv.FormatInt(st.applied, 10), After: strconv.FormatInt(found, 10),
			Reason: st.drift, Epoch: l.d.Epoch, Result: string(l.cfg.DriftPolicy)}); err != nil {
			l.d.Log.Error("audit drift", "err", err)
		}
	}
	// The value found is the new baseline: a repair write this tick
	// replaces it; a failed or unneeded repair is not reported again.
	st.driftFrom, st.applied = st.applied, found
	if l.cfg.DriftPolicy == config.DriftAdopt {
		// Take the new value as the current allocation; the dwell starts now.
		st.drift = ""
		l.planner.Touch(vm.Name, synthesizer.CPU)
	}
}
