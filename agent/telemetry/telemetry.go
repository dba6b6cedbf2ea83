//go:build linux

package telemetry

import (
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Probe names, as in Config.Disable, Status and the metrics' probe label.
const (
	ProbeSched   = "sched"    // runqlat: sched_wakeup[_new], sched_switch
	ProbeFaults  = "faults"   // page_fault_user, page_fault_kernel
	ProbeBlockIO = "blockio"  // block_io_start, block_rq_issue, block_rq_complete
	ProbeKVMExit = "kvm_exit" // kvm_exit
)

// Probes lists every probe in load order.
var Probes = []string{ProbeSched, ProbeFaults, ProbeBlockIO, ProbeKVMExit}

// Config selects and tunes the probes.
type Config struct {
	// Disable names probes not to load (see Probes).
	Disable []string
	// SpikeThreshold: a tracked vCPU's run-queue delay at or above it is a
	// Spike event (Telemetry.Spikes); 0 disables spike events.
	SpikeThreshold time.Duration
	// ProgramStats enables the kernel's BPF run-time statistics
	// (BPF_STATS_RUN_TIME, host-wide while held) so the metrics carry per
	// program run count and run time. It costs ~20 ns per program run.
	ProgramStats bool
	// ProcRoot is /proc unless set (tests).
	ProcRoot string
	// PinDir, when set, is a bpffs directory (mounted when absent) where
	// maps and links are pinned so the next agent re-uses them: telemetry
	// survives a restart (see pin.go).
	PinDir string
}

// ProbeStatus is one probe's state: loaded and attached, or why not.
type ProbeStatus struct {
	Name    string
	Enabled bool  // false: disabled in Config
	Loaded  bool  // loaded and attached
	Err     error // why it is not loaded (nil when loaded or disabled)
}

func (s ProbeStatus) String() string {
	switch {
	case s.Loaded:
		return s.Name + ": on"
	case !s.Enabled:
		return s.Name + ": off (disabled in config)"
	default:
		return fmt.Sprintf("%s: off: %v", s.Name, s.Err)
	}
}

// Telemetry owns every probe; each loads or fails on its own, and a failed
// probe (missing BTF or tracepoint, verifier rejection) is logged with the
// full verifier log, reported by Status and the ars_bpf_probe_up metric,
// and leaves the others running. All methods are safe for concurrent use.
//
// It satisfies agent.RunqSource (Track, Untrack, Read), so the agent loop
// can use it where it used *Runqlat.
type Telemetry struct {
	Runq    *Runqlat  // nil when the probe is off
	Faults  *Faults   // nil when the probe is off
	BlockIO *BlockIO  // nil when the probe is off
	KVM     *KVMExits // nil when the probe is off

	procRoot string
	status   map[string]ProbeStatus
	stats    interface{ Close() error } // BPF_STATS_RUN_TIME while held

	mu      sync.Mutex
	threads map[uint32]vcpuRef // tid -> slots (Track)
	vms     map[uint32]VMRef   // VM slot -> process and taps (TrackVM)
}

type vcpuRef struct{ vm, vcpu uint32 }

// VMRef is what telemetry needs to know of a VM besides its vCPU threads.
type VMRef struct {
	Name  string   // the metrics' vm label
	PID   int      // QEMU process
	NetNS string   // network namespace of the taps: a name under /run/netns or a path; "" is the host's
	Taps  []string // its tap links
}

// failProbe, set by tests, makes a probe's load fail with its error.
var failProbe func(probe string) error

// Open loads every probe not disabled in cfg. It does not fail: a probe
// that cannot load is off, with the reason in Status (log may be nil).
func Open(cfg Config, log *slog.Logger) *Telemetry {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	t := &Telemetry{
		procRoot: cfg.ProcRoot,
		status:   make(map[string]ProbeStatus),
		threads:  make(map[uint32]vcpuRef),
		vms:      make(map[uint32]VMRef),
	}
	if t.procRoot == "" {
		t.procRoot = "/proc"
	}
	if cfg.PinDir != "" {
		if err := EnsureBPFFS(cfg.PinDir); err != nil {
			log.Warn("eBPF maps not pinned: telemetry will restart from zero with the agent", "dir", cfg.PinDir, "err", err)
			cfg.PinDir = ""
		}
	}
	disabled := make(map[string]bool)
	for _, n := range cfg.Disable {
		disabled[n] = true
	}
	load := func(name string, fn func() error) {
		st := ProbeStatus{Name: name, Enabled: !disabled[name]}
		if st.Enabled {
			if failProbe != nil {
				if err := failProbe(name); err != nil {
					fn = func() error { return err }
				}
			}
			if err := fn(); err != nil {
				st.Err = err
				// %+v: a verifier error carries its whole log.
				log.Error("eBPF probe disabled, the others keep running", "probe", name, "err", fmt.Sprintf("%+v", err))
			} else {
				st.Loaded = true
				log.Info("eBPF probe on", "probe", name)
			}
		}
		t.status[name] = st
	}
	load(ProbeSched, func() (err error) {
		r, err := LoadRunqlatPinned(cfg.PinDir)
		if err != nil {
			return err
		}
		if err := r.SetSpikeThreshold(cfg.SpikeThreshold); err != nil {
			return errors.Join(err, r.Close())
		}
		t.Runq = r
		return nil
	})
	load(ProbeFaults, func() (err error) { t.Faults, err = LoadFaultsPinned(cfg.PinDir); return err })
	load(ProbeBlockIO, func() (err error) { t.BlockIO, err = LoadBlockIOPinned(cfg.PinDir); return err })
	load(ProbeKVMExit, func() (err error) { t.KVM, err = LoadKVMExitsPinned(cfg.PinDir); return err })
	if cfg.ProgramStats {
		s, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
		if err != nil {
			log.Warn("BPF run-time statistics unavailable", "err", err)
		} else {
			t.stats = s
		}
	}
	return t
}

// Status reports every probe, in Probes order.
func (t *Telemetry) Status() []ProbeStatus {
	out := make([]ProbeStatus, 0, len(Probes))
	for _, n := range Probes {
		out = append(out, t.status[n])
	}
	return out
}

// Track starts accounting for vCPU thread tid of VM vmSlot (run-queue
// delay and KVM exits).
func (t *Telemetry) Track(tid, vmSlot, vcpuSlot uint32) error {
	var errs []error
	if t.Runq != nil {
		errs = append(errs, t.Runq.Track(tid, vmSlot, vcpuSlot))
	}
	if t.KVM != nil {
		errs = append(errs, t.KVM.Track(tid, vcpuSlot))
	}
	t.mu.Lock()
	t.threads[tid] = vcpuRef{vmSlot, vcpuSlot}
	t.mu.Unlock()
	return errors.Join(errs...)
}

// Untrack stops accounting for tid.
func (t *Telemetry) Untrack(tid uint32) error {
	var errs []error
	if t.Runq != nil {
		errs = append(errs, t.Runq.Untrack(tid))
	}
	if t.KVM != nil {
		errs = append(errs, t.KVM.Untrack(tid))
	}
	t.mu.Lock()
	delete(t.threads, tid)
	t.mu.Unlock()
	return errors.Join(errs...)
}

// Read is Runqlat.Read, or an empty map when the sched probe is off.
func (t *Telemetry) Read() (map[uint32]VCPUStats, error) {
	if t.Runq == nil {
		return map[uint32]VCPUStats{}, nil
	}
	return t.Runq.Read()
}

// TrackVM starts accounting for VM vmSlot: page faults and block I/O of
// its QEMU process and its taps' link statistics. Its vCPU threads are
// tracked with Track. Tracking again updates the reference.
func (t *Telemetry) TrackVM(vmSlot uint32, vm VMRef) error {
	var errs []error
	if t.Faults != nil {
		errs = append(errs, t.Faults.TrackProcess(uint32(vm.PID), vmSlot))
	}
	if t.BlockIO != nil {
		errs = append(errs, t.BlockIO.TrackProcess(uint32(vm.PID), vmSlot))
	}
	vm.Taps = append([]string(nil), vm.Taps...)
	t.mu.Lock()
	t.vms[vmSlot] = vm
	t.mu.Unlock()
	return errors.Join(errs...)
}

// UntrackVM stops accounting for VM vmSlot's process (its vCPU threads are
// untracked with Untrack).
func (t *Telemetry) UntrackVM(vmSlot uint32) error {
	t.mu.Lock()
	ref, ok := t.vms[vmSlot]
	delete(t.vms, vmSlot)
	t.mu.Unlock()
	if !ok {
		return nil
	}
	var errs []error
	if t.Faults != nil {
		errs = append(errs, t.Faults.UntrackProcess(uint32(ref.PID)))
	}
	if t.BlockIO != nil {
		errs = append(errs, t.BlockIO.UntrackProcess(uint32(ref.PID)))
	}
	return errors.Join(errs...)
}

// NetStats are a tap's link counters (netlink, as `ip -s link`), from the
// host's side: Rx is what the guest sent.
type NetStats struct {
	RxBytes, TxBytes     uint64
	RxPackets, TxPackets uint64
	RxDropped, TxDropped uint64
}

// Sub is the change since prev.
func (s NetStats) Sub(p NetStats) NetStats {
	return NetStats{
		sat(s.RxBytes, p.RxBytes), sat(s.TxBytes, p.TxBytes),
		sat(s.RxPackets, p.RxPackets), sat(s.TxPackets, p.TxPackets),
		sat(s.RxDropped, p.RxDropped), sat(s.TxDropped, p.TxDropped),
	}
}

// VMSample is everything telemetry knows about one VM at one instant.
// Counters are cumulative since tracking (eBPF) or since the process or
// link started (Minor/Major faults, Net); take the change over a tick with
// Sub.
type VMSample struct {
	VMSlot uint32
	Name   string
	PID    int
	At     time.Time
	// VCPUs by vCPU slot (run-queue delay, on-CPU time, ...); Sched is
	// their sum.
	VCPUs    map[uint32]VCPUStats
	Sched    VCPUStats
	KVMExits map[uint32]uint64 // by vCPU slot; empty without KVM
	Faults   FaultStats
	IO       IOStats
	Net      map[string]NetStats // by tap name
	// Errors are the parts that could not be read this time (a probe that
	// is off is not an error).
	Errors []error
}

// Sub is the change since prev (same VM).
func (s VMSample) Sub(prev VMSample) VMSample {
	out := s
	out.VCPUs = make(map[uint32]VCPUStats, len(s.VCPUs))
	for k, v := range s.VCPUs {
		out.VCPUs[k] = v.Sub(prev.VCPUs[k])
	}
	out.Sched = s.Sched.Sub(prev.Sched)
	out.KVMExits = make(map[uint32]uint64, len(s.KVMExits))
	for k, v := range s.KVMExits {
		out.KVMExits[k] = sat(v, prev.KVMExits[k])
	}
	out.Faults = s.Faults.Sub(prev.Faults)
	out.IO = s.IO.Sub(prev.IO)
	out.Net = make(map[string]NetStats, len(s.Net))
	for k, v := range s.Net {
		out.Net[k] = v.Sub(prev.Net[k])
	}
	return out
}

// Sample reads every probe once (one map walk each) and returns one
// VMSample per tracked VM, by VM slot. vCPU threads tracked with a VM slot
// that has no TrackVM still get a VMSample (without process counters).
func (t *Telemetry) Sample() (map[uint32]*VMSample, error) {
	now := time.Now()
	t.mu.Lock()
	threads := make(map[uint32]vcpuRef, len(t.threads))
	for k, v := range t.threads {
		threads[k] = v
	}
	vms := make(map[uint32]VMRef, len(t.vms))
	for k, v := range t.vms {
		vms[k] = v
	}
	t.mu.Unlock()

	out := make(map[uint32]*VMSample)
	get := func(slot uint32) *VMSample {
		s, ok := out[slot]
		if !ok {
			ref := vms[slot]
			s = &VMSample{VMSlot: slot, Name: ref.Name, PID: ref.PID, At: now,
				VCPUs: map[uint32]VCPUStats{}, KVMExits: map[uint32]uint64{}, Net: map[string]NetStats{}}
			out[slot] = s
		}
		return s
	}
	for slot := range vms {
		get(slot)
	}
	var errs []error
	if t.Runq != nil {
		rq, err := t.Runq.Read()
		errs = append(errs, err)
		for tid, st := range rq {
			ref, ok := threads[tid]
			if !ok {
				continue
			}
			s := get(ref.vm)
			s.VCPUs[ref.vcpu] = s.VCPUs[ref.vcpu].Add(st)
			s.Sched = s.Sched.Add(st)
		}
	}
	if t.KVM != nil {
		ex, err := t.KVM.Read()
		errs = append(errs, err)
		for tid, n := range ex {
			if ref, ok := threads[tid]; ok {
				get(ref.vm).KVMExits[ref.vcpu] += n
			}
		}
	}
	byPID := make(map[uint32]uint32, len(vms))
	for slot, ref := range vms {
		byPID[uint32(ref.PID)] = slot
	}
	if t.Faults != nil {
		f, err := t.Faults.Read()
		errs = append(errs, err)
		for pid, st := range f {
			if slot, ok := byPID[pid]; ok {
				get(slot).Faults = st
			}
		}
	}
	if t.BlockIO != nil {
		io, err := t.BlockIO.Read()
		errs = append(errs, err)
		for pid, st := range io {
			if slot, ok := byPID[pid]; ok {
				get(slot).IO = st
			}
		}
	}
	for slot, ref := range vms {
		s := get(slot)
		if ref.PID > 0 {
			minor, major, err := ReadProcFaults(t.procRoot, ref.PID)
			if err != nil {
				s.Errors = append(s.Errors, fmt.Errorf("faults of pid %d: %w", ref.PID, err))
			} else {
				s.Faults.Minor, s.Faults.Major = minor, major
			}
		}
		if len(ref.Taps) > 0 {
			net, err := ReadLinkStats(ref.NetNS, ref.Taps)
			if err != nil {
				s.Errors = append(s.Errors, err)
			}
			for k, v := range net {
				s.Net[k] = v
			}
		}
	}
	return out, errors.Join(errs...)
}

// ReadLinkStats reads network links' counters through netlink, in network
// namespace ns (a name under /run/netns, a path, or "" for the host's).
// It returns what it could read and the errors of the rest.
func ReadLinkStats(ns string, links []string) (map[string]NetStats, error) {
	h := &netlink.Handle{}
	if ns != "" {
		var (
			nsh netns.NsHandle
			err error
		)
		if strings.HasPrefix(ns, "/") {
			nsh, err = netns.GetFromPath(ns)
		} else {
			nsh, err = netns.GetFromName(ns)
		}
		if err != nil {
			return nil, fmt.Errorf("netns %s: %w", ns, err)
		}
		defer nsh.Close()
		if h, err = netlink.NewHandleAt(nsh); err != nil {
			return nil, fmt.Errorf("netlink in netns %s: %w", ns, err)
		}
		defer h.Close()
	}
	out := make(map[string]NetStats, len(links))
	var errs []error
	for _, name := range links {
		l, err := h.LinkByName(name)
		if err != nil {
			errs = append(errs, fmt.Errorf("link %s: %w", name, err))
			continue
		}
		st := l.Attrs().Statistics
		if st == nil {
			errs = append(errs, fmt.Errorf("link %s: no statistics", name))
			continue
		}
		out[name] = NetStats{
			RxBytes: st.RxBytes, TxBytes: st.TxBytes,
			RxPackets: st.RxPackets, TxPackets: st.TxPackets,
			RxDropped: st.RxDropped, TxDropped: st.TxDropped,
		}
	}
	return out, errors.Join(errs...)
}

// Spikes opens the reader of run-queue delay spikes, or fails when the
// sched probe is off.
func (t *Telemetry) Spikes() (*SpikeReader, error) {
	if t.Runq == nil {
		return nil, errors.New("telemetry: sched probe is off: no spike events")
	}
	return t.Runq.Spikes()
}

// programs lists every loaded program by probe and attach point.
func (t *Telemetry) programs() []probeProgram {
	var out []probeProgram
	add := func(probe string, m map[string]*ebpf.Program) {
		names := make([]string, 0, len(m))
		for n := range m {
			names = append(names, n)
		}
		sort.Strings(names)
		for _, n := range names {
			out = append(out, probeProgram{probe, n, m[n]})
		}
	}
	if t.Runq != nil {
		add(ProbeSched, t.Runq.Programs())
	}
	if t.Faults != nil {
		add(ProbeFaults, t.Faults.Programs())
	}
	if t.BlockIO != nil {
		add(ProbeBlockIO, t.BlockIO.Programs())
	}
	if t.KVM != nil {
		add(ProbeKVMExit, t.KVM.Programs())
	}
	return out
}

type probeProgram struct {
	probe, name string
	prog        *ebpf.Program
}

// Close detaches every probe.
func (t *Telemetry) Close() error {
	var errs []error
	if t.Runq != nil {
		errs = append(errs, t.Runq.Close())
	}
	if t.Faults != nil {
		errs = append(errs, t.Faults.Close())
	}
	if t.BlockIO != nil {
		errs = append(errs, t.BlockIO.Close())
	}
	if t.KVM != nil {
		errs = append(errs, t.KVM.Close())
	}
	if t.stats != nil {
		errs = append(errs, t.stats.Close())
	}
	return errors.Join(errs...)
}
