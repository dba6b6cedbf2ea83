package qmpact

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ars-dev/ars/agent/qmp"
	goqmp "github.com/digitalocean/go-qemu/qmp"
	"github.com/digitalocean/go-qemu/qmp/raw"
)

// Conn is the QMP connection a Controller drives: *qmp.Monitor or
// *Reconnecting.
type Conn interface {
	Execute(ctx context.Context, name string, args, out any) error
	Events(ctx context.Context) (<-chan goqmp.Event, error)
}

var (
	_ Conn      = (*qmp.Monitor)(nil)
	_ Conn      = (*Reconnecting)(nil)
	_ VMControl = (*Controller)(nil)
)

// Options tune a Controller.
type Options struct {
	Limits
	// CommandTimeout caps every command's deadline (the context's wins if
	// sooner). Default DefaultCommandTimeout.
	CommandTimeout time.Duration
	// BalloonPath is the balloon device's QOM path for GuestMemStats;
	// empty finds it under /machine/peripheral{,-anon}.
	BalloonPath string
	// StatsInterval is the guest's memory-statistics period set on the
	// balloon device by GuestMemStats. Default 2 s.
	StatsInterval time.Duration
	// UnplugPoll is how often RemoveCPU re-reads the slots while waiting
	// for DEVICE_DELETED (in case the event was lost to a reconnect).
	// Default 1 s.
	UnplugPoll time.Duration
	// UnplugTimeout bounds RemoveCPU's wait when its context has no
	// deadline. Default 30 s.
	UnplugTimeout time.Duration
	// AllowReplug lets AddCPU run after a vCPU unplug was requested from
	// this QEMU. It is refused by default (ErrReplugUnsafe) because QEMU 7.2
	// under TCG aborts ("double free or corruption") on any vCPU
	// device_add that follows a completed vCPU unplug, whatever the slot
	// or id (measured on these hosts). Set it for QEMU versions or
	// accelerators known to be fixed.
	AllowReplug bool
}

// DefaultCommandTimeout bounds a command whose context has no sooner
// deadline.
const DefaultCommandTimeout = 5 * time.Second

// Controller is VMControl over one QMP connection. It is safe for
// concurrent use; QEMU runs the commands one at a time.
type Controller struct {
	conn Conn
	opts Options

	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu          sync.Mutex
	actual      uint64 // last BALLOON_CHANGE, 0 if none
	actualAt    time.Time
	gone        error // set on SHUTDOWN
	goneCh      chan struct{}
	eventsEnded bool
	deleted     map[string][]chan struct{} // DEVICE_DELETED waiters by id
	ost         map[string]OST
	counts      map[string]uint64
	statsOn     bool
	unplugged   int // vCPU unplugs requested (device_del accepted)
	balloonPath string
}

// OST is a guest's ACPI _OST answer to a hotplug request (ACPI_DEVICE_OST).
type OST struct {
	Device   string `json:"device"`
	Slot     string `json:"slot"`
	SlotType string `json:"slot-type"`
	Source   int    `json:"source"` // 1 = insertion, 3 = eject request, 0x103 = eject
	Status   int    `json:"status"` // 0 = success
	At       time.Time
}

// NewController wraps conn, subscribes to its events and, when
// opts.MaxMem is zero, reads the VM's boot memory (query-memory-size-summary)
// as the balloon's upper bound. Close stops the event goroutine; it does
// not close conn.
func NewController(ctx context.Context, conn Conn, opts Options) (*Controller, error) {
	if opts.CommandTimeout <= 0 {
		opts.CommandTimeout = DefaultCommandTimeout
	}
	if opts.MinBalloon == 0 {
		opts.MinBalloon = DefaultMinBalloon
	}
	if opts.StatsInterval <= 0 {
		opts.StatsInterval = 2 * time.Second
	}
	if opts.UnplugPoll <= 0 {
		opts.UnplugPoll = time.Second
	}
	if opts.UnplugTimeout <= 0 {
		opts.UnplugTimeout = 30 * time.Second
	}
	c := &Controller{
		conn:        conn,
		opts:        opts,
		goneCh:      make(chan struct{}),
		deleted:     map[string][]chan struct{}{},
		ost:         map[string]OST{},
		counts:      map[string]uint64{},
		balloonPath: opts.BalloonPath,
	}
	evCtx, cancel := context.WithCancel(context.Background())
	evs, err := conn.Events(evCtx)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("qmpact: subscribe to events: %w", err)
	}
	c.cancel = cancel
	c.wg.Add(1)
	go c.handleEvents(evCtx, evs)
	if c.opts.MaxMem == 0 {
		var sum struct {
			Base uint64 `json:"base-memory"`
		}
		if err := c.exec(ctx, "query-memory-size-summary", nil, &sum); err != nil {
			c.Close()
			return nil, err
		}
		c.opts.MaxMem = sum.Base
	}
	if c.opts.MinBalloon > c.opts.MaxMem {
		c.Close()
		return nil, fmt.Errorf("%w: MinBalloon %d > MaxMem %d", ErrInvalid, c.opts.MinBalloon, c.opts.MaxMem)
	}
	return c, nil
}

// Limits are the bounds the Controller validates against.
func (c *Controller) Limits() Limits { return c.opts.Limits }

// Close stops the event goroutine and fails RemoveCPU waits.
func (c *Controller) Close() error {
	c.cancel()
	c.wg.Wait()
	return nil
}

// Gone is closed when QEMU announced SHUTDOWN; Err then says why.
func (c *Controller) Gone() <-chan struct{} { return c.goneCh }

// Err is nil while the VM is believed alive, else an error wrapping ErrVMGone.
func (c *Controller) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.gone
}

// LastBalloonChange is the actual size from the latest BALLOON_CHANGE
// event and when it arrived; ok is false before the first one.
func (c *Controller) LastBalloonChange() (actual uint64, at time.Time, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.actual, c.actualAt, !c.actualAt.IsZero()
}

// OST returns the guest's latest ACPI _OST answer for a device id.
func (c *Controller) OST(id string) (OST, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	o, ok := c.ost[id]
	return o, ok
}

// EventCount is how many events of a kind the Controller has seen.
func (c *Controller) EventCount(name string) uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.counts[name]
}

func (c *Controller) handleEvents(ctx context.Context, evs <-chan goqmp.Event) {
	defer c.wg.Done()
loop:
	for {
		select {
		case ev, ok := <-evs:
			if !ok {
				break loop
			}
			c.handle(ev)
		case <-ctx.Done():
			break loop
		}
	}
	c.mu.Lock()
	c.eventsEnded = true
	for id, ws := range c.deleted {
		for _, w := range ws {
			close(w) // waiters re-check and see why
		}
		delete(c.deleted, id)
	}
	c.mu.Unlock()
}

func eventTime(ev goqmp.Event) time.Time {
	if ev.Timestamp.Seconds == 0 {
		return time.Now()
	}
	return time.Unix(ev.Timestamp.Seconds, ev.Timestamp.Microseconds*1000)
}

func (c *Controller) handle(ev goqmp.Event) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.counts[ev.Event]++
	switch ev.Event {
	case "BALLOON_CHANGE":
		if a, ok := number(ev.Data["actual"]); ok && a > 0 {
			c.actual, c.actualAt = uint64(a), eventTime(ev)
		}
	case "DEVICE_DELETED":
		// QEMU 7.2 sends DEVICE_DELETED for an x86 vCPU's lapic child
		// (path /machine/peripheral/ID/lapic) but none for the vCPU itself,
		// so an event for the device or any child wakes its waiters, who
		// confirm with query-hotpluggable-cpus.
		id, _ := ev.Data["device"].(string)
		if p, _ := ev.Data["path"].(string); strings.HasPrefix(p, "/machine/peripheral/") {
			id, _, _ = strings.Cut(strings.TrimPrefix(p, "/machine/peripheral/"), "/")
		}
		for _, w := range c.deleted[id] {
			close(w)
		}
		delete(c.deleted, id)
	case "ACPI_DEVICE_OST":
		b, _ := json.Marshal(ev.Data["info"])
		var o OST
		if json.Unmarshal(b, &o) == nil && o.Device != "" {
			o.At = eventTime(ev)
			c.ost[o.Device] = o
		}
	case "SHUTDOWN":
		if c.gone == nil {
			reason, _ := ev.Data["reason"].(string)
			c.gone = fmt.Errorf("%w: QEMU announced SHUTDOWN (reason %q)", ErrVMGone, reason)
			close(c.goneCh)
		}
	}
}

func number(v any) (float64, bool) {
	switch n := v.(type) {
	case float64:
		return n, true
	case json.Number:
		f, err := n.Float64()
		return f, err == nil
	}
	return 0, false
}

// exec runs one command under the Controller's deadline cap, refusing it
// once the VM is gone.
func (c *Controller) exec(ctx context.Context, name string, args, out any) error {
	if err := c.Err(); err != nil {
		return fmt.Errorf("qmp: %s: %w", name, err)
	}
	ctx, cancel := context.WithTimeout(ctx, c.opts.CommandTimeout)
	defer cancel()
	return c.conn.Execute(ctx, name, args, out)
}

// Balloon implements VMControl.
func (c *Controller) Balloon(ctx context.Context, target uint64) error {
	if err := validateBalloon(target, c.opts.Limits); err != nil {
		return err
	}
	return c.exec(ctx, "balloon", map[string]int64{"value": int64(target)}, nil)
}

// BalloonActual implements VMControl.
func (c *Controller) BalloonActual(ctx context.Context) (uint64, error) {
	var bi raw.BalloonInfo
	if err := c.exec(ctx, "query-balloon", nil, &bi); err != nil {
		return 0, err
	}
	if bi.Actual <= 0 {
		return 0, fmt.Errorf("qmp: query-balloon: implausible actual %d", bi.Actual)
	}
	return uint64(bi.Actual), nil
}

// WaitBalloon polls BalloonActual until it is within tol bytes of target
// or ctx ends; it returns the last actual size.
func (c *Controller) WaitBalloon(ctx context.Context, target, tol uint64) (uint64, error) {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		a, err := c.BalloonActual(ctx)
		if err != nil {
			return a, err
		}
		if a+tol >= target && a <= target+tol {
			return a, nil
		}
		select {
		case <-ctx.Done():
			return a, fmt.Errorf("qmpact: balloon actual %d MiB, target %d MiB: %w", a>>20, target>>20, ctx.Err())
		case <-tick.C:
		}
	}
}

func (c *Controller) findBalloon(ctx context.Context) (string, error) {
	c.mu.Lock()
	p := c.balloonPath
	c.mu.Unlock()
	if p != "" {
		return p, nil
	}
	for _, parent := range []string{"/machine/peripheral", "/machine/peripheral-anon"} {
		var props []struct {
			Name string `json:"name"`
			Type string `json:"type"`
		}
		if err := c.exec(ctx, "qom-list", map[string]string{"path": parent}, &props); err != nil {
			return "", err
		}
		for _, pr := range props {
			if strings.HasPrefix(pr.Type, "child<virtio-balloon") {
				p = parent + "/" + pr.Name
				c.mu.Lock()
				c.balloonPath = p
				c.mu.Unlock()
				return p, nil
			}
		}
	}
	return "", fmt.Errorf("%w: no virtio-balloon device", ErrNotFound)
}

// GuestMemStats implements VMControl.
func (c *Controller) GuestMemStats(ctx context.Context) (MemStats, error) {
	path, err := c.findBalloon(ctx)
	if err != nil {
		return MemStats{}, err
	}
	c.mu.Lock()
	on := c.statsOn
	c.mu.Unlock()
	if !on {
		secs := max(1, int64(c.opts.StatsInterval/time.Second))
		if err := c.exec(ctx, "qom-set", map[string]any{"path": path, "property": "guest-stats-polling-interval", "value": secs}, nil); err != nil {
			return MemStats{}, err
		}
		c.mu.Lock()
		c.statsOn = true
		c.mu.Unlock()
	}
	var gs struct {
		Stats      map[string]int64 `json:"stats"`
		LastUpdate int64            `json:"last-update"`
	}
	if err := c.exec(ctx, "qom-get", map[string]any{"path": path, "property": "guest-stats"}, &gs); err != nil {
		return MemStats{}, err
	}
	get := func(k string) int64 {
		if v, ok := gs.Stats[k]; ok {
			return v
		}
		return -1
	}
	ms := MemStats{
		Total: get("stat-total-memory"), Free: get("stat-free-memory"), Available: get("stat-available-memory"),
		DiskCaches: get("stat-disk-caches"), SwapIn: get("stat-swap-in"), SwapOut: get("stat-swap-out"),
		MajorFault: get("stat-major-faults"), MinorFault: get("stat-minor-faults"),
	}
	if gs.LastUpdate > 0 {
		ms.LastUpdate = time.Unix(gs.LastUpdate, 0)
	}
	return ms, nil
}

// hotpluggableCPU is query-hotpluggable-cpus' entry. raw.HotpluggableCPU
// types props as node/socket/core/thread only; QEMU 7.2 adds die-id and
// cluster-id, which device_add must get back, so props stay a map.
type hotpluggableCPU struct {
	Type    string           `json:"type"`
	Props   map[string]int64 `json:"props"`
	QOMPath string           `json:"qom-path"`
}

// HotplugCPUs implements VMControl.
func (c *Controller) HotplugCPUs(ctx context.Context) ([]CPUSlot, error) {
	var hs []hotpluggableCPU
	if err := c.exec(ctx, "query-hotpluggable-cpus", nil, &hs); err != nil {
		return nil, err
	}
	var fast []qmp.CPUInfoFast
	if err := c.exec(ctx, "query-cpus-fast", nil, &fast); err != nil {
		return nil, err
	}
	byPath := map[string]qmp.CPUInfoFast{}
	for _, f := range fast {
		byPath[f.QOMPath] = f
	}
	slots := make([]CPUSlot, 0, len(hs))
	for _, h := range hs {
		s := CPUSlot{Type: h.Type, Props: h.Props, QOMPath: h.QOMPath}
		if id, ok := strings.CutPrefix(h.QOMPath, "/machine/peripheral/"); ok {
			s.ID = id
		}
		if f, ok := byPath[h.QOMPath]; ok && h.QOMPath != "" {
			s.CPUIndex, s.ThreadID = f.CPUIndex, f.ThreadID
		}
		slots = append(slots, s)
	}
	sort.Slice(slots, func(i, j int) bool { return slotKey(slots[i]) < slotKey(slots[j]) })
	return slots, nil
}

var propOrder = []string{"node-id", "drawer-id", "book-id", "socket-id", "die-id", "cluster-id", "core-id", "thread-id"}

func slotKey(s CPUSlot) string {
	var b strings.Builder
	for _, k := range propOrder {
		fmt.Fprintf(&b, "%08d.", s.Props[k])
	}
	return b.String()
}

// slotID names a vCPU device from its location.
func slotID(s CPUSlot) string {
	id := "ars-cpu"
	for _, k := range propOrder {
		if v, ok := s.Props[k]; ok && k != "node-id" {
			id += "-" + strconv.FormatInt(v, 10)
		}
	}
	return id
}

// AddCPU implements VMControl. See Options.AllowReplug.
func (c *Controller) AddCPU(ctx context.Context) (CPUSlot, error) {
	c.mu.Lock()
	n := c.unplugged
	c.mu.Unlock()
	if n > 0 && !c.opts.AllowReplug {
		return CPUSlot{}, fmt.Errorf("%w: %d vCPU unplug(s) already requested from this QEMU", ErrReplugUnsafe, n)
	}
	slots, err := c.HotplugCPUs(ctx)
	if err != nil {
		return CPUSlot{}, err
	}
	var free *CPUSlot
	for i := range slots {
		if !slots[i].Plugged() {
			free = &slots[i]
			break
		}
	}
	if free == nil {
		return CPUSlot{}, fmt.Errorf("%w (%d slots)", ErrNoFreeSlot, len(slots))
	}
	id := slotID(*free)
	args := map[string]any{"driver": free.Type, "id": id}
	for k, v := range free.Props {
		args[k] = v
	}
	if err := c.exec(ctx, "device_add", args, nil); err != nil {
		return CPUSlot{}, err
	}
	slots, err = c.HotplugCPUs(ctx)
	if err != nil {
		return CPUSlot{ID: id}, fmt.Errorf("qmpact: vCPU %s added, reading it back: %w", id, err)
	}
	for _, s := range slots {
		if s.ID == id {
			return s, nil
		}
	}
	return CPUSlot{ID: id}, fmt.Errorf("qmpact: vCPU %s added but not listed by query-hotpluggable-cpus", id)
}

// RemoveCPU implements VMControl.
func (c *Controller) RemoveCPU(ctx context.Context, id string) error {
	if err := validateCPUID(id); err != nil {
		return err
	}
	slots, err := c.HotplugCPUs(ctx)
	if err != nil {
		return err
	}
	if !hasCPU(slots, id) {
		return fmt.Errorf("%w: no hot-plugged vCPU %q", ErrNotFound, id)
	}
	w, err := c.addWaiter(id)
	if err != nil {
		return err
	}
	defer func() { c.dropWaiter(id, w) }()

	if err := c.exec(ctx, "device_del", map[string]string{"id": id}, nil); err != nil {
		return err
	}
	// Accepted: the guest may complete it at any time, even after we stop
	// waiting, so re-plugging is unsafe from now on (Options.AllowReplug).
	c.noteUnplug()
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.opts.UnplugTimeout)
		defer cancel()
	}
	poll := time.NewTicker(c.opts.UnplugPoll)
	defer poll.Stop()
	for {
		select {
		case <-w:
			// An event for the device (or the end of the event stream):
			// confirm, and keep waiting if the slot is still plugged.
			c.dropWaiter(id, w)
			if w, err = c.addWaiter(id); err != nil {
				w = nil // stream ended: rely on polling
			}
			slots, err := c.HotplugCPUs(ctx)
			if err == nil && !hasCPU(slots, id) {
				return nil
			}
		case <-c.goneCh:
			return fmt.Errorf("qmpact: device_del %s: %w", id, c.Err())
		case <-ctx.Done():
			return fmt.Errorf("qmpact: device_del %s: %w (%w)", id, ErrUnplugPending, ctx.Err())
		case <-poll.C:
			slots, err := c.HotplugCPUs(ctx)
			if err == nil && !hasCPU(slots, id) {
				return nil
			}
		}
	}
}

func (c *Controller) noteUnplug() {
	c.mu.Lock()
	c.unplugged++
	c.mu.Unlock()
}

func (c *Controller) addWaiter(id string) (chan struct{}, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.eventsEnded {
		return nil, fmt.Errorf("qmpact: device_del %s: event stream ended (connection lost)", id)
	}
	w := make(chan struct{})
	c.deleted[id] = append(c.deleted[id], w)
	return w, nil
}

func hasCPU(slots []CPUSlot, id string) bool {
	for _, s := range slots {
		if s.ID == id {
			return true
		}
	}
	return false
}

func (c *Controller) dropWaiter(id string, w chan struct{}) {
	c.mu.Lock()
	defer c.mu.Unlock()
	ws := c.deleted[id]
	for i, x := range ws {
		if x == w {
			c.deleted[id] = append(ws[:i], ws[i+1:]...)
			break
		}
	}
	if len(c.deleted[id]) == 0 {
		delete(c.deleted, id)
	}
}

// drive finds a drive in query-block by backend name, qdev id or QOM path.
func (c *Controller) drive(ctx context.Context, device string) (raw.BlockInfo, error) {
	var bis []raw.BlockInfo
	if err := c.exec(ctx, "query-block", nil, &bis); err != nil {
		return raw.BlockInfo{}, err
	}
	var names []string
	for _, b := range bis {
		q := ""
		if b.Qdev != nil {
			q = *b.Qdev
		}
		if b.Device == device || (q != "" && (q == device || q == "/machine/peripheral/"+device+"/virtio-backend")) {
			if b.Inserted == nil {
				return b, fmt.Errorf("%w: drive %q has no medium", ErrNotFound, device)
			}
			return b, nil
		}
		names = append(names, b.Device+"("+q+")")
	}
	return raw.BlockInfo{}, fmt.Errorf("%w: drive %q (have %s)", ErrNotFound, device, strings.Join(names, ", "))
}

// SetBlockThrottle implements VMControl.
func (c *Controller) SetBlockThrottle(ctx context.Context, device string, t Throttle) error {
	if err := validateDevice(device); err != nil {
		return err
	}
	if err := t.Validate(); err != nil {
		return err
	}
	b, err := c.drive(ctx, device)
	if err != nil {
		return err
	}
	arg := raw.BlockIOThrottle{
		Bps: t.BPS, BpsRd: t.BPSRead, BpsWr: t.BPSWrite,
		Iops: t.IOPS, IopsRd: t.IOPSRead, IopsWr: t.IOPSWrite,
	}
	if b.Device != "" {
		arg.Device = &b.Device
	} else {
		arg.ID = b.Qdev // -blockdev drives have no backend name
	}
	return c.exec(ctx, "block_set_io_throttle", arg, nil)
}

// BlockThrottle implements VMControl.
func (c *Controller) BlockThrottle(ctx context.Context, device string) (Throttle, error) {
	if err := validateDevice(device); err != nil {
		return Throttle{}, err
	}
	b, err := c.drive(ctx, device)
	if err != nil {
		return Throttle{}, err
	}
	in := b.Inserted
	return Throttle{BPS: in.Bps, BPSRead: in.BpsRd, BPSWrite: in.BpsWr, IOPS: in.Iops, IOPSRead: in.IopsRd, IOPSWrite: in.IopsWr}, nil
}

// isIdempotent says whether re-sending a command after a lost connection
// can do no harm (it reads, or sets an absolute value).
func isIdempotent(name string) bool {
	switch name {
	case "balloon", "block_set_io_throttle", "qom-get", "qom-list", "qom-set":
		return true
	}
	return strings.HasPrefix(name, "query-")
}
