package agent

import (
	"fmt"
	"math"
	"sort"
	"strconv"
	"strings"

	"github.com/ars-dev/ars/agent/config"
	"github.com/ars-dev/ars/agent/executor"
	"github.com/ars-dev/ars/agent/status"
	"github.com/ars-dev/ars/mapper"
	"github.com/ars-dev/ars/synthesizer"
)

// The loop manages CPU (cgroup quota) and memory (balloon) through the
// Planner. Disk and network SLAs are validated and kept, but not planned
// live yet: their actuators exist (qmpact block throttle, tc) and the
// executor applies them, but the loop has no per-drive/per-tap demand
// signal wired in, so it leaves them alone rather than guess.
var liveResources = []synthesizer.Resource{synthesizer.CPU, synthesizer.Memory}

type loanKey struct {
	lender, borrower string
	r                synthesizer.Resource
}

// input builds one VM's Planner input from this tick's observation.
func (l *Loop) input(vm VM, st *vmState) synthesizer.VMInput {
	sla, _ := l.d.SLAs.For(vm.Name)
	// Only what the loop manages enters the plan (floors included).
	sla.Disk, sla.Network = synthesizer.DiskSLA{}, synthesizer.NetworkSLA{}
	if !st.mem.valid || !sla.AllowTopologyChanges {
		sla.Memory = synthesizer.MemorySLA{}
	} else if st.mem.maxMiB < sla.Memory.CeilingMiB {
		// No balloon target above the VM's boot memory.
		sla.Memory.CeilingMiB = max(st.mem.maxMiB, sla.Memory.FloorMiB)
	}
	in := synthesizer.VMInput{Name: vm.Name, SLA: sla}
	st.sla = sla
	st.last.Class, st.last.Priority = string(sla.Class.Norm()), sla.Priority
	st.last.FloorMillicores, st.last.CeilingMillicores = sla.CPU.FloorMillicores, sla.CPU.CeilingMillicores

	// CPU.
	var cur int64
	if st.prevCPU.QuotaUs > 0 && st.prevCPU.PeriodUs > 0 {
		cur = st.prevCPU.QuotaUs * 1000 / int64(st.prevCPU.PeriodUs)
	}
	st.cur[synthesizer.CPU] = cur
	in.Current[synthesizer.CPU] = cur
	if st.drift != "" && l.cfg.DriftPolicy == config.DriftRepair && st.driftFrom > 0 && st.prevCPU.PeriodUs > 0 {
		// Plan from what ARS had set; the action puts it back.
		in.Current[synthesizer.CPU] = st.driftFrom * 1000 / int64(st.prevCPU.PeriodUs)
	}
	in.Required[synthesizer.CPU] = -1
	if f, ok := st.model.Forecast(); ok {
		st.last.ForecastMillicores = f.P50
		st.forecast, st.haveForecast = f, true
		req := int64(math.Ceil(f.Alloc))
		// A VM that wanted more than it had this tick (throttled, or
		// waiting to run) gets at least that at once: the forecast learns a
		// new level over a few ticks; the VM should not wait for it.
		if d := int64(math.Ceil(st.last.DemandMillicores)); cur > 0 && d > cur && d > req {
			req = d
		}
		if st.adopted && f.Samples < WarmupSamples && req < cur && cur <= sla.CPU.CeilingMillicores {
			// Restarted: keep the limit found in place while the model warms up.
			req = cur
			st.hold = fmt.Sprintf("hold: adopting the limit found in place until the model has %d samples", WarmupSamples)
		} else {
			st.hold = ""
		}
		in.Required[synthesizer.CPU] = req
		st.forecastNote = fmt.Sprintf("forecast p50=%.0fm alloc=%.0fm", f.P50, f.Alloc)
		if req > int64(math.Ceil(f.Alloc)) {
			st.forecastNote = fmt.Sprintf("demand %.0fm above the allocation; forecast p50=%.0fm alloc=%.0fm", st.last.DemandMillicores, f.P50, f.Alloc)
		}
	}
	st.required[synthesizer.CPU] = in.Required[synthesizer.CPU]

	// Memory.
	if st.mem.valid && sla.Memory.CeilingMiB > 0 {
		in.Current[synthesizer.Memory] = st.mem.actualMiB
		in.Required[synthesizer.Memory] = st.mem.requiredMiB
		st.cur[synthesizer.Memory] = st.mem.actualMiB
		st.required[synthesizer.Memory] = st.mem.requiredMiB
	}
	return in
}

// plan runs the Planner. When the floors of the running VMs do not fit
// the host's capacity (VMs on default SLAs, or a capacity set too small),
// that resource is planned without the host limit — every VM inside its
// own SLA, nothing borrowed — and the condition is reported: refusing to
// act would leave VMs at whatever limit they have.
func (l *Loop) plan(inputs []synthesizer.VMInput) (*synthesizer.Plan, error) {
	c := l.d.Capacity
	var sum [synthesizer.NumResources]int64
	for _, in := range inputs {
		for _, r := range liveResources {
			if f, _, ok := in.SLA.Bounds(r); ok {
				sum[r] += f
			}
		}
	}
	var notes []string
	for _, r := range liveResources {
		if a := c.Allocatable(r); a > 0 && sum[r] > a {
			notes = append(notes, fmt.Sprintf("%s floors of the running VMs sum to %d, above the allocatable %d: planned without the host limit", r, sum[r], a))
			c.Set(r, 0, 0)
		}
	}
	msg := strings.Join(notes, "; ")
	if msg != l.planErr {
		if msg != "" {
			l.d.Log.Error("host over-committed by SLA floors", "detail", msg)
		}
		l.planErr = msg
	}
	p, err := l.planner.Plan(inputs, c)
	if err != nil {
		return nil, fmt.Errorf("plan: %w", err)
	}
	return p, nil
}

// actionsFor turns the plan into executor actions: one per VM and
// resource whose target differs from what is in force on the host (so a
// drifted limit is rewritten even when the plan holds it).
func (l *Loop) actionsFor(live []VM, p *synthesizer.Plan) []executor.Action {
	reasons := map[string]string{}
	for _, c := range p.Changes {
		reasons[c.VM+"/"+c.Resource.String()] = c.Reason
	}
	byName := make(map[string]VM, len(live))
	for _, vm := range live {
		byName[vm.Name] = vm
	}
	var out []executor.Action
	for _, vr := range p.VMs {
		st, vm := l.vms[vr.Name], byName[vr.Name]
		if st == nil {
			continue
		}
		// CPU.
		if t := vr.Target[synthesizer.CPU]; t > 0 && st.required[synthesizer.CPU] >= 0 {
			reason := reasons[vr.Name+"/cpu"]
			if reason == "" {
				reason = "hold"
			}
			if st.hold != "" {
				reason = st.hold + "; " + reason
			}
			if st.forecastNote != "" {
				reason += " (" + st.forecastNote + ")"
			}
			repair := st.drift != "" && l.cfg.DriftPolicy == config.DriftRepair
			if repair {
				reason = st.drift + "; repair: " + reason
			}
			st.last.LastDecision = reason
			if t != st.cur[synthesizer.CPU] || repair {
				out = append(out, executor.Action{VM: vr.Name, Kind: executor.KindCPUQuota, Group: vm.Group,
					Millicores: t, Reason: reason, Epoch: l.d.Epoch})
			}
		}
		// Memory: the balloon target, never below what the guest uses now
		// plus a margin (a balloon inflated into the working set OOM-kills
		// the guest), never above its boot memory.
		if t := vr.Target[synthesizer.Memory]; t > 0 && st.mem.valid {
			t = min(max(t, int64(st.mem.usedMiB)+memSafetyMiB), st.mem.maxMiB)
			if t != st.mem.targetMiB {
				reason := reasons[vr.Name+"/memory"]
				if reason == "" {
					reason = "balloon target follows the plan"
				}
				reason += fmt.Sprintf(" (guest uses %.0f MiB, demand %.0f MiB)", st.mem.usedMiB, st.mem.demandMiB)
				out = append(out, executor.Action{VM: vr.Name, Kind: executor.KindBalloon,
					Bytes: uint64(t) << 20, Reason: reason, Epoch: l.d.Epoch})
			}
		}
	}
	return out
}

// recordPlan publishes loans and throttling per VM, and logs and audits
// loans opened, changed and returned, and throttling begun and ended.
func (l *Loop) recordPlan(p *synthesizer.Plan) {
	for _, vr := range p.VMs {
		st := l.vms[vr.Name]
		if st == nil {
			continue
		}
		st.last.BorrowedMillicores = vr.Borrowed[synthesizer.CPU]
		st.last.LentMillicores = vr.Lent[synthesizer.CPU]
		st.last.BorrowedMemMiB = vr.Borrowed[synthesizer.Memory]
		st.last.LentMemMiB = vr.Lent[synthesizer.Memory]
		st.last.RequiredMillicores = vr.Required[synthesizer.CPU]
		for _, r := range liveResources {
			thr := vr.Throttled[r]
			key := vr.Name + "/" + r.String()
			if thr {
				l.throttled[key]++
			}
			if thr != st.throttled[r] {
				st.throttled[r] = thr
				what, kind := "throttle ended", "throttle.end."+r.String()
				if thr {
					what, kind = "throttled to what the host could give", "throttle."+r.String()
				}
				detail := fmt.Sprintf("%s: required %d, granted %d, floor %s", what, vr.Required[r], vr.Target[r], floorOf(st.sla, r))
				if thr {
					l.d.Log.Warn("SLA cannot be met", "vm", vr.Name, "resource", r.String(), "required", vr.Required[r], "granted", vr.Target[r])
				} else {
					l.d.Log.Info("throttle ended", "vm", vr.Name, "resource", r.String())
				}
				l.audit(executor.Record{VM: vr.Name, Kind: kind, Target: r.String(),
					Before: strconv.FormatInt(vr.Required[r], 10), After: strconv.FormatInt(vr.Target[r], 10),
					Reason: detail, Result: "alert"})
			}
		}
		st.last.ThrottledCPU = vr.Throttled[synthesizer.CPU]
		st.last.ThrottledMem = vr.Throttled[synthesizer.Memory]
	}
	now := map[loanKey]synthesizer.Loan{}
	for _, ln := range p.Loans {
		k := loanKey{ln.Lender, ln.Borrower, ln.Resource}
		now[k] = ln
		old, had := l.loans[k]
		if had && old.Amount == ln.Amount {
			continue
		}
		before := "0"
		if had {
			before = strconv.FormatInt(old.Amount, 10)
		}
		l.d.Log.Info("loan", "lender", ln.Lender, "borrower", ln.Borrower, "resource", ln.Resource.String(), "before", before, "amount", ln.Amount)
		l.audit(executor.Record{VM: ln.Borrower, Kind: "loan." + ln.Resource.String(), Target: "from " + ln.Lender,
			Before: before, After: strconv.FormatInt(ln.Amount, 10),
			Reason: fmt.Sprintf("%s borrows %d of %s from %s (lower priority, predicted idle first)", ln.Borrower, ln.Amount, ln.Resource, ln.Lender),
			Result: "loan"})
	}
	keys := make([]loanKey, 0, len(l.loans))
	for k := range l.loans {
		if _, ok := now[k]; !ok {
			keys = append(keys, k)
		}
	}
	sort.Slice(keys, func(i, j int) bool { return fmt.Sprint(keys[i]) < fmt.Sprint(keys[j]) })
	for _, k := range keys {
		old := l.loans[k]
		l.d.Log.Info("loan returned", "lender", k.lender, "borrower", k.borrower, "resource", k.r.String(), "amount", old.Amount)
		l.audit(executor.Record{VM: k.borrower, Kind: "loan." + k.r.String(), Target: "from " + k.lender,
			Before: strconv.FormatInt(old.Amount, 10), After: "0",
			Reason: fmt.Sprintf("loan of %d %s returned to %s", old.Amount, k.r, k.lender), Result: "returned"})
	}
	l.loans = now
}

func floorOf(s synthesizer.SLA, r synthesizer.Resource) string {
	f, _, _ := s.Bounds(r)
	return strconv.FormatInt(f, 10)
}

// audit appends a non-executor event to the audit log, if there is one.
func (l *Loop) audit(r executor.Record) {
	if l.d.Audit == nil {
		return
	}
	r.Time, r.Actor, r.Epoch = l.d.Now().UTC(), "arsd", l.d.Epoch
	if err := l.d.Audit(r); err != nil {
		l.d.Log.Error("audit", "kind", r.Kind, "err", err)
	}
}

// capacityStatus reports allocatable, allocated and free per managed
// resource after the plan.
func (l *Loop) capacityStatus(p *synthesizer.Plan) []status.Capacity {
	var out []status.Capacity
	for _, r := range liveResources {
		c := status.Capacity{Resource: r.String(), Allocatable: l.d.Capacity.Allocatable(r)}
		if p != nil {
			for _, vr := range p.VMs {
				c.Allocated += vr.Target[r]
			}
		}
		out = append(out, c)
	}
	return out
}

func mapperLoans(ls []synthesizer.Loan) []mapper.Loan {
	out := make([]mapper.Loan, len(ls))
	for i, l := range ls {
		out[i] = mapper.Loan{Lender: l.Lender, Borrower: l.Borrower, Resource: l.Resource.String(), Amount: l.Amount, Since: l.Since}
	}
	return out
}

func statusLoans(ls []synthesizer.Loan) []status.Loan {
	out := make([]status.Loan, len(ls))
	for i, l := range ls {
		out[i] = status.Loan{Lender: l.Lender, Borrower: l.Borrower, Resource: l.Resource.String(), Amount: l.Amount, Since: l.Since}
	}
	return out
}
