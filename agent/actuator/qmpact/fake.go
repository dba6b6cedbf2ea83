package qmpact

import (
	"context"
	"fmt"
	"sync"
)

// Call is one VMControl call recorded by Fake.
type Call struct {
	Method string
	Device string // RemoveCPU id, throttle drive
	Bytes  uint64 // Balloon target
	Thr    Throttle
	Err    error // what the call returned
}

// Fake is an in-memory VMControl: a VM with a balloon that reaches its
// target at once, CPU slots and drives. It validates like Controller and
// records every call, including refused ones. Set Fail to make the next
// calls of a method fail. Safe for concurrent use.
type Fake struct {
	Limits Limits
	// AllowReplug mirrors Options.AllowReplug: without it AddCPU after a
	// RemoveCPU fails with ErrReplugUnsafe, as Controller's does.
	AllowReplug bool

	mu       sync.Mutex
	removed  int
	actual   uint64
	slots    []CPUSlot
	throttle map[string]Throttle
	calls    []Call
	fail     map[string]error
	nextTID  int
}

var _ VMControl = (*Fake)(nil)

// NewFake returns a VM with memBytes of memory (also the balloon's max),
// bootCPUs of maxCPUs slots plugged, and the given drives unthrottled.
func NewFake(memBytes uint64, bootCPUs, maxCPUs int, drives ...string) *Fake {
	f := &Fake{
		Limits:   Limits{MinBalloon: min(DefaultMinBalloon, memBytes), MaxMem: memBytes},
		actual:   memBytes,
		throttle: map[string]Throttle{},
		fail:     map[string]error{},
		nextTID:  1000,
	}
	for i := 0; i < maxCPUs; i++ {
		s := CPUSlot{Type: "qemu64-x86_64-cpu", Props: map[string]int64{"socket-id": 0, "core-id": int64(i), "thread-id": 0}}
		if i < bootCPUs {
			s.QOMPath = fmt.Sprintf("/machine/unattached/device[%d]", i)
			s.CPUIndex, s.ThreadID = i, f.tid()
		}
		f.slots = append(f.slots, s)
	}
	for _, d := range drives {
		f.throttle[d] = Throttle{}
	}
	return f
}

func (f *Fake) tid() int { f.nextTID++; return f.nextTID }

// Fail makes calls of method (e.g. "Balloon") return err until Fail(method, nil).
func (f *Fake) Fail(method string, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err == nil {
		delete(f.fail, method)
	} else {
		f.fail[method] = err
	}
}

// Calls returns the recorded calls.
func (f *Fake) Calls() []Call {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]Call(nil), f.calls...)
}

func (f *Fake) record(c Call, err error) error {
	c.Err = err
	f.calls = append(f.calls, c)
	return err
}

func (f *Fake) pre(ctx context.Context, method string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return f.fail[method]
}

// Balloon implements VMControl.
func (f *Fake) Balloon(ctx context.Context, target uint64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := Call{Method: "Balloon", Bytes: target}
	if err := validateBalloon(target, f.Limits); err != nil {
		return f.record(c, err)
	}
	if err := f.pre(ctx, c.Method); err != nil {
		return f.record(c, err)
	}
	f.actual = target
	return f.record(c, nil)
}

// BalloonActual implements VMControl.
func (f *Fake) BalloonActual(ctx context.Context) (uint64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	err := f.record(Call{Method: "BalloonActual"}, f.pre(ctx, "BalloonActual"))
	return f.actual, err
}

// GuestMemStats implements VMControl: the guest uses a quarter of its memory.
func (f *Fake) GuestMemStats(ctx context.Context) (MemStats, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	err := f.record(Call{Method: "GuestMemStats"}, f.pre(ctx, "GuestMemStats"))
	a := int64(f.actual)
	return MemStats{Total: a, Free: a * 3 / 4, Available: a * 3 / 4, DiskCaches: -1, SwapIn: -1, SwapOut: -1, MajorFault: -1, MinorFault: -1}, err
}

// HotplugCPUs implements VMControl.
func (f *Fake) HotplugCPUs(ctx context.Context) ([]CPUSlot, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.record(Call{Method: "HotplugCPUs"}, f.pre(ctx, "HotplugCPUs")); err != nil {
		return nil, err
	}
	return f.copySlots(), nil
}

func (f *Fake) copySlots() []CPUSlot {
	out := make([]CPUSlot, len(f.slots))
	for i, s := range f.slots {
		s.Props = clonemap(s.Props)
		out[i] = s
	}
	return out
}

func clonemap(m map[string]int64) map[string]int64 {
	o := make(map[string]int64, len(m))
	for k, v := range m {
		o[k] = v
	}
	return o
}

// AddCPU implements VMControl.
func (f *Fake) AddCPU(ctx context.Context) (CPUSlot, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := Call{Method: "AddCPU"}
	if err := f.pre(ctx, c.Method); err != nil {
		return CPUSlot{}, f.record(c, err)
	}
	if f.removed > 0 && !f.AllowReplug {
		return CPUSlot{}, f.record(c, fmt.Errorf("%w: %d vCPU unplug(s) already requested", ErrReplugUnsafe, f.removed))
	}
	for i := range f.slots {
		s := &f.slots[i]
		if !s.Plugged() {
			s.ID = slotID(*s)
			s.QOMPath = "/machine/peripheral/" + s.ID
			s.CPUIndex, s.ThreadID = i, f.tid()
			c.Device = s.ID
			f.record(c, nil)
			out := *s
			out.Props = clonemap(s.Props)
			return out, nil
		}
	}
	return CPUSlot{}, f.record(c, ErrNoFreeSlot)
}

// RemoveCPU implements VMControl; the fake guest always releases the vCPU.
func (f *Fake) RemoveCPU(ctx context.Context, id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := Call{Method: "RemoveCPU", Device: id}
	if err := validateCPUID(id); err != nil {
		return f.record(c, err)
	}
	if err := f.pre(ctx, c.Method); err != nil {
		return f.record(c, err)
	}
	for i := range f.slots {
		s := &f.slots[i]
		if s.ID == id {
			s.ID, s.QOMPath, s.CPUIndex, s.ThreadID = "", "", 0, 0
			f.removed++
			return f.record(c, nil)
		}
	}
	return f.record(c, fmt.Errorf("%w: no hot-plugged vCPU %q", ErrNotFound, id))
}

// SetBlockThrottle implements VMControl.
func (f *Fake) SetBlockThrottle(ctx context.Context, device string, t Throttle) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := Call{Method: "SetBlockThrottle", Device: device, Thr: t}
	if err := validateDevice(device); err != nil {
		return f.record(c, err)
	}
	if err := t.Validate(); err != nil {
		return f.record(c, err)
	}
	if err := f.pre(ctx, c.Method); err != nil {
		return f.record(c, err)
	}
	if _, ok := f.throttle[device]; !ok {
		return f.record(c, fmt.Errorf("%w: drive %q", ErrNotFound, device))
	}
	f.throttle[device] = t
	return f.record(c, nil)
}

// BlockThrottle implements VMControl.
func (f *Fake) BlockThrottle(ctx context.Context, device string) (Throttle, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := Call{Method: "BlockThrottle", Device: device}
	if err := validateDevice(device); err != nil {
		return Throttle{}, f.record(c, err)
	}
	if err := f.pre(ctx, c.Method); err != nil {
		return Throttle{}, f.record(c, err)
	}
	t, ok := f.throttle[device]
	if !ok {
		return Throttle{}, f.record(c, fmt.Errorf("%w: drive %q", ErrNotFound, device))
	}
	return t, f.record(c, nil)
}
