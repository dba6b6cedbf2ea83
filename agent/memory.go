package agent

import (
	"context"
	"fmt"
	"math"
	"time"

	"github.com/ars-dev/ars/agent/actuator/qmpact"
	"github.com/ars-dev/ars/predictor"
)

// Memory is managed through the balloon, for VMs whose SLA has a memory
// ceiling and allows topology changes (the guest sees its memory size
// change). Each tick the loop reads the balloon's actual size and the
// guest's memory statistics over QMP; the working set is what the guest
// uses (total − available) plus what its kernel does not count (balloon
// actual − total: kernel image, reserved memory); demand is predictor.MemDemand of it (plus
// major faults), forecast by the VM's memory model; the requirement is
// the forecast allocation plus memHeadroomMiB, which the guest needs for
// page cache and for allocations between two ticks. The balloon target is
// never set below the guest's use plus memSafetyMiB, nor above its boot
// memory. The host cgroup memory limit of QEMU is not changed: a ballooned
// guest's freed pages stay in QEMU's RSS until the host reclaims them, so
// a cgroup limit would only risk killing QEMU.
const (
	memHeadroomMiB = 32
	memSafetyMiB   = 16
	memQMPTimeout  = time.Second
)

type memState struct {
	valid       bool // balloon and guest statistics read this tick
	model       predictor.Model
	maxMiB      int64 // boot memory
	actualMiB   int64 // balloon actual
	targetMiB   int64 // last target ARS set (0: none yet)
	usedMiB     float64
	demandMiB   float64
	requiredMiB int64
	prevMajor   int64
	prevAt      time.Time
	// overheadMiB is balloon actual − the guest's own total (kernel image,
	// reserved memory); changedAt is when ARS last set the balloon.
	overheadMiB  float64
	haveOverhead bool
	changedAt    time.Time
}

// limiter is implemented by qmpact.Controller (the boot memory size).
type limiter interface{ Limits() qmpact.Limits }

// observeMem reads one VM's memory over QMP and updates its model. A VM
// whose SLA does not manage memory is not queried.
func (l *Loop) observeMem(ctx context.Context, vm VM, st *vmState) error {
	ms := &st.mem
	ms.valid = false
	sla, _ := l.d.SLAs.For(vm.Name)
	if l.d.QMP == nil || sla.Memory.CeilingMiB == 0 || !sla.AllowTopologyChanges {
		return nil
	}
	ctl, err := l.d.QMP(vm.Name)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, memQMPTimeout)
	defer cancel()
	actual, err := ctl.BalloonActual(ctx)
	if err != nil {
		return fmt.Errorf("balloon: %w", err)
	}
	gs, err := ctl.GuestMemStats(ctx)
	if err != nil {
		return fmt.Errorf("guest memory statistics: %w", err)
	}
	if gs.Total <= 0 || gs.Available < 0 || gs.Free < 0 {
		return nil // the guest has not reported yet (first poll just enabled)
	}
	ms.actualMiB = int64(actual >> 20)
	ms.maxMiB = sla.Memory.CeilingMiB
	if lim, ok := ctl.(limiter); ok && lim.Limits().MaxMem > 0 {
		ms.maxMiB = min(ms.maxMiB, int64(lim.Limits().MaxMem>>20))
	}
	const mib = 1 << 20
	obs := predictor.MemObservation{UsageBytes: float64(gs.Total - gs.Free), ReclaimableBytes: float64(gs.Available - gs.Free)}
	now := l.d.Now()
	if gs.MajorFault >= 0 && !ms.prevAt.IsZero() && gs.MajorFault >= ms.prevMajor {
		if dt := now.Sub(ms.prevAt).Seconds(); dt > 0 {
			obs.MajorFaultsPerSec = float64(gs.MajorFault-ms.prevMajor) / dt
		}
	}
	ms.prevMajor, ms.prevAt = gs.MajorFault, now
	// The balloon sizes the whole guest; the guest's statistics count only
	// what its kernel manages (MemTotal leaves out the kernel image,
	// reserved areas and an unpacked initramfs). That overhead is added so
	// that use, demand and the balloon target are all in balloon units.
	// The guest reports every StatsInterval; right after a balloon change
	// its total is stale, and actual − total would be off by the change.
	// The overhead is a constant of the guest, so it is measured only from
	// a report made a second or more after ARS last moved the balloon.
	if fresh := gs.LastUpdate.After(ms.changedAt.Add(time.Second)); fresh || !ms.haveOverhead {
		ms.overheadMiB = max(float64(actual)-float64(gs.Total), 0) / mib
		ms.haveOverhead = fresh
	}
	overhead := ms.overheadMiB
	ms.usedMiB = float64(gs.Total-gs.Available)/mib + overhead
	ms.demandMiB = predictor.MemDemand(obs)/mib + overhead
	if ms.model == nil {
		m, err := predictor.New(l.cfg.Predictor, l.cfg.Tick)
		if err != nil {
			return err
		}
		ms.model = m
	}
	if err := ms.model.Observe(ms.demandMiB); err != nil {
		return err
	}
	req := ms.demandMiB
	if f, ok := ms.model.Forecast(); ok {
		req = math.Max(req, f.Alloc)
		st.last.MemForecastMiB = f.P50
	}
	ms.requiredMiB = int64(math.Ceil(req)) + memHeadroomMiB
	if ms.targetMiB == 0 {
		ms.targetMiB = ms.actualMiB
	}
	ms.valid = true
	st.last.MemUsedMiB, st.last.MemDemandMiB, st.last.MemAllocMiB = ms.usedMiB, ms.demandMiB, ms.actualMiB
	st.last.MemFloorMiB, st.last.MemCeilingMiB = sla.Memory.FloorMiB, ms.maxMiB
	return nil
}
