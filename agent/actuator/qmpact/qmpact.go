// Package qmpact owns ARS's QMP actuator: the only code in the agent that
// changes a running QEMU through its monitor. It covers
//
//   - the memory balloon: target (balloon), actual (query-balloon and
//     BALLOON_CHANGE events) and the guest's memory statistics (the balloon
//     device's guest-stats QOM property);
//   - vCPU hotplug and unplug: query-hotpluggable-cpus, device_add,
//     device_del, with the unplug completed by the DEVICE_DELETED event and
//     the new vCPU's host thread found with query-cpus-fast;
//   - block I/O throttling: block_set_io_throttle, read back with
//     query-block.
//
// Everything goes through VMControl. Controller implements it over one QMP
// connection (a *qmp.Monitor from agent/qmp, or a Reconnecting one that
// redials the same socket, peer PID checked, after the connection drops);
// Fake implements it in memory for the executor's tests. Arguments are
// validated before any command is sent; every command runs under a
// deadline (the context's, capped by Options.CommandTimeout); QMP error
// replies come back as *qmp.Error naming the command. A Controller consumes
// the monitor's events: BALLOON_CHANGE (last actual size), DEVICE_DELETED
// (completes RemoveCPU), ACPI_DEVICE_OST (the guest's answer to a hotplug)
// and SHUTDOWN (the VM is gone: later calls fail with ErrVMGone).
//
// go-qemu's generated types (raw.BalloonInfo, raw.BlockIOThrottle,
// raw.BlockInfo) are used where they match QEMU 7.2's schema; commands are
// sent with qmp.Monitor.Execute rather than raw.Monitor's methods because
// the latter take no context and so cannot carry a per-command deadline.
package qmpact

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"time"
)

// VMControl is what the executor may change on one VM through QMP.
type VMControl interface {
	// Balloon sets the balloon target: the guest's memory size in bytes,
	// within [Limits.MinBalloon, Limits.MaxMem]. It returns once QEMU has
	// accepted the target; the guest follows asynchronously (BalloonActual).
	Balloon(ctx context.Context, targetBytes uint64) error
	// BalloonActual is the guest's current memory size as the balloon
	// reports it (query-balloon).
	BalloonActual(ctx context.Context) (uint64, error)
	// GuestMemStats reads the guest's memory statistics through the
	// balloon driver (enables the device's stats polling on first use).
	GuestMemStats(ctx context.Context) (MemStats, error)
	// HotplugCPUs lists every vCPU slot, plugged or free.
	HotplugCPUs(ctx context.Context) ([]CPUSlot, error)
	// AddCPU plugs a vCPU into the lowest free slot and returns it with
	// its host thread. Onlining it is the guest's job. Controller refuses
	// it after an unplug from the same QEMU (ErrReplugUnsafe).
	AddCPU(ctx context.Context) (CPUSlot, error)
	// RemoveCPU asks for the unplug of a hot-plugged vCPU (device_del) and
	// waits for QEMU's DEVICE_DELETED, which needs the guest's cooperation.
	// If ctx ends first the request stays pending in the guest and the
	// error wraps ErrUnplugPending.
	RemoveCPU(ctx context.Context, id string) error
	// SetBlockThrottle replaces the I/O limits of a drive (a block backend
	// name such as "disk0" or a guest device's qdev id or QOM path). Zero
	// removes a limit.
	SetBlockThrottle(ctx context.Context, device string, t Throttle) error
	// BlockThrottle reads a drive's current limits (query-block).
	BlockThrottle(ctx context.Context, device string) (Throttle, error)
}

var (
	// ErrInvalid is wrapped by every argument validation error. Such a
	// call has sent nothing to QEMU.
	ErrInvalid = errors.New("qmpact: invalid argument")
	// ErrVMGone is wrapped by calls after QEMU announced SHUTDOWN, or when
	// a reconnect finds the QEMU process gone.
	ErrVMGone = errors.New("qmpact: VM is gone")
	// ErrUnplugPending is wrapped by RemoveCPU when the deadline passed
	// before the guest released the vCPU.
	ErrUnplugPending = errors.New("qmpact: vCPU unplug still pending in the guest")
	// ErrNoFreeSlot is returned by AddCPU when every vCPU slot is plugged.
	ErrNoFreeSlot = errors.New("qmpact: no free vCPU slot")
	// ErrReplugUnsafe is wrapped by AddCPU after a vCPU unplug from the
	// same QEMU: see Options.AllowReplug.
	ErrReplugUnsafe = errors.New("qmpact: vCPU hotplug after an unplug crashes QEMU 7.2/TCG")
	// ErrNotFound is wrapped when a named drive or vCPU does not exist.
	ErrNotFound = errors.New("qmpact: not found")
)

// Limits bound the values the actuator accepts.
type Limits struct {
	// MinBalloon is the smallest balloon target accepted, in bytes.
	// Default DefaultMinBalloon.
	MinBalloon uint64
	// MaxMem is the largest balloon target: the VM's boot memory. Zero
	// makes NewController ask QEMU (query-memory-size-summary).
	MaxMem uint64
}

// DefaultMinBalloon keeps a Linux guest alive: below this the balloon
// driver drives the guest into the OOM killer.
const DefaultMinBalloon = 64 << 20

// MaxThrottle is QEMU's largest accepted throttle value (THROTTLE_VALUE_MAX).
const MaxThrottle = 1_000_000_000_000_000

// Throttle is a drive's I/O limits; zero means unlimited. A total limit
// (BPS, IOPS) cannot be combined with the same kind's read/write limits.
type Throttle struct {
	BPS, BPSRead, BPSWrite    int64 // bytes per second
	IOPS, IOPSRead, IOPSWrite int64 // operations per second
}

// Validate checks t as QEMU would, so a bad value is refused before any
// command is sent.
func (t Throttle) Validate() error {
	for _, f := range []struct {
		name string
		v    int64
	}{{"bps", t.BPS}, {"bps_rd", t.BPSRead}, {"bps_wr", t.BPSWrite}, {"iops", t.IOPS}, {"iops_rd", t.IOPSRead}, {"iops_wr", t.IOPSWrite}} {
		if f.v < 0 {
			return fmt.Errorf("%w: throttle %s = %d is negative", ErrInvalid, f.name, f.v)
		}
		if f.v > MaxThrottle {
			return fmt.Errorf("%w: throttle %s = %d exceeds %d", ErrInvalid, f.name, f.v, int64(MaxThrottle))
		}
	}
	if t.BPS > 0 && (t.BPSRead > 0 || t.BPSWrite > 0) {
		return fmt.Errorf("%w: throttle bps cannot be combined with bps_rd/bps_wr", ErrInvalid)
	}
	if t.IOPS > 0 && (t.IOPSRead > 0 || t.IOPSWrite > 0) {
		return fmt.Errorf("%w: throttle iops cannot be combined with iops_rd/iops_wr", ErrInvalid)
	}
	return nil
}

// CPUSlot is one vCPU slot of query-hotpluggable-cpus, joined with
// query-cpus-fast when plugged.
type CPUSlot struct {
	// ID is the qdev id of a vCPU plugged with device_add (its QOM path is
	// /machine/peripheral/ID); empty for boot vCPUs and free slots.
	ID string
	// Type is the CPU model's QOM type, the device_add driver.
	Type string
	// Props locate the slot (socket-id, core-id, thread-id, ...).
	Props map[string]int64
	// QOMPath is empty for a free slot.
	QOMPath string
	// CPUIndex and ThreadID (the host thread running the vCPU) are set
	// for plugged slots; ThreadID is 0 when unknown.
	CPUIndex int
	ThreadID int
}

// Plugged reports whether a vCPU occupies the slot.
func (s CPUSlot) Plugged() bool { return s.QOMPath != "" }

// Hotplugged reports whether the vCPU was added with device_add (and so
// may be removed with RemoveCPU).
func (s CPUSlot) Hotplugged() bool { return s.ID != "" }

// MemStats are the guest's memory statistics reported by its balloon
// driver; a field is -1 when the guest did not report it.
type MemStats struct {
	LastUpdate time.Time // zero until the guest's first report
	Total      int64     // stat-total-memory
	Free       int64     // stat-free-memory
	Available  int64     // stat-available-memory
	DiskCaches int64     // stat-disk-caches
	SwapIn     int64     // stat-swap-in
	SwapOut    int64     // stat-swap-out
	MajorFault int64     // stat-major-faults
	MinorFault int64     // stat-minor-faults
}

// qdev ids: QEMU's id_wellformed (a letter, then letters, digits, - . _).
var idRE = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9._-]{0,127}$`)

func validateBalloon(target uint64, l Limits) error {
	if target < l.MinBalloon || target > l.MaxMem {
		return fmt.Errorf("%w: balloon target %d bytes (%d MiB) outside [%d, %d] bytes",
			ErrInvalid, target, target>>20, l.MinBalloon, l.MaxMem)
	}
	return nil
}

func validateCPUID(id string) error {
	if !idRE.MatchString(id) {
		return fmt.Errorf("%w: vCPU device id %q is not a qdev id", ErrInvalid, id)
	}
	return nil
}

func validateDevice(device string) error {
	if device == "" || len(device) > 4096 {
		return fmt.Errorf("%w: drive name %q", ErrInvalid, device)
	}
	return nil
}
