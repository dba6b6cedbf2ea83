//go:build linux

package telemetry

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// FaultStats are a process's page faults. User and Kernel are page-fault
// exceptions taken in user and kernel mode, counted by eBPF since the
// process was tracked; Minor and Major are the kernel's own accounting
// (/proc/PID/stat minflt, majflt; since the process started), which is the
// only source of the minor/major split on a locked-down kernel without
// fexit (see bpf/faults.bpf.c).
type FaultStats struct {
	User, Kernel uint64
	Minor, Major uint64
}

// Sub is the change since prev.
func (s FaultStats) Sub(prev FaultStats) FaultStats {
	return FaultStats{
		User: sat(s.User, prev.User), Kernel: sat(s.Kernel, prev.Kernel),
		Minor: sat(s.Minor, prev.Minor), Major: sat(s.Major, prev.Major),
	}
}

func sat(a, b uint64) uint64 {
	if a < b {
		return 0
	}
	return a - b
}

// Faults is the loaded and attached page-fault program (bpf/faults.bpf.c,
// tp_btf/page_fault_user and page_fault_kernel). Methods may be called
// concurrently; Close last.
type Faults struct {
	maps  faultsMaps
	progs faultsPrograms
	links []link.Link
	ncpu  int
}

// LoadFaults loads and attaches the page-fault program. It counts nothing
// until TrackProcess.
func LoadFaults() (*Faults, error) { return LoadFaultsPinned("") }

// LoadFaultsPinned is LoadFaults with its maps and links pinned under
// pinRoot (see pin.go); "" pins nothing.
func LoadFaultsPinned(pinRoot string) (*Faults, error) {
	dir, err := pinDir(pinRoot, ProbeFaults, _FaultsBytes)
	if err != nil {
		return nil, fmt.Errorf("faults: %w", err)
	}
	spec, err := loadFaults()
	if err != nil {
		return nil, fmt.Errorf("faults: parse embedded object: %w", err)
	}
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		return nil, fmt.Errorf("faults: possible CPUs: %w", err)
	}
	var objs faultsObjects
	if err := spec.LoadAndAssign(&objs, pinOptions(spec, dir)); err != nil {
		return nil, fmt.Errorf("faults: load: %w", verifierDetail(err))
	}
	f := &Faults{maps: objs.faultsMaps, progs: objs.faultsPrograms, ncpu: ncpu}
	for name, p := range f.Programs() {
		l, err := attach(dir, name, p)
		if err != nil {
			return nil, errors.Join(fmt.Errorf("faults: attach tp_btf/%s: %w", name, err), f.Close())
		}
		f.links = append(f.links, l)
	}
	return f, nil
}

// TrackProcess starts counting the faults of process tgid (all its
// threads) for VM slot vmSlot. Tracking again keeps the counters.
func (f *Faults) TrackProcess(tgid, vmSlot uint32) error {
	zero := make([]faultsFaultStats, f.ncpu)
	if err := f.maps.Faults.Update(tgid, zero, ebpf.UpdateNoExist); err != nil && !errors.Is(err, ebpf.ErrKeyExist) {
		return fmt.Errorf("faults: track %d: %w", tgid, err)
	}
	if err := f.maps.Procs.Update(tgid, vmSlot, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("faults: track %d: %w", tgid, err)
	}
	return nil
}

// UntrackProcess stops counting tgid and drops its counters.
func (f *Faults) UntrackProcess(tgid uint32) error {
	return deleteKeys("faults", tgid, f.maps.Procs, f.maps.Faults)
}

func deleteKeys(what string, key uint32, maps ...*ebpf.Map) error {
	var errs []error
	for _, m := range maps {
		if err := m.Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, fmt.Errorf("%s: untrack %d: %w", what, key, err))
		}
	}
	return errors.Join(errs...)
}

// Read returns the eBPF counters (User, Kernel) of every tracked process,
// summed over CPUs; see ReadProcFaults for Minor and Major.
func (f *Faults) Read() (map[uint32]FaultStats, error) {
	out := make(map[uint32]FaultStats)
	var (
		tgid   uint32
		percpu []faultsFaultStats
	)
	it := f.maps.Faults.Iterate()
	for it.Next(&tgid, &percpu) {
		var s FaultStats
		for _, c := range percpu {
			s.User += c.User
			s.Kernel += c.Kernel
		}
		out[tgid] = s
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("faults: read: %w", err)
	}
	return out, nil
}

// Errors returns the in-kernel failure count (a tracked process's stats
// entry missing: a TrackProcess/UntrackProcess race).
func (f *Faults) Errors() (uint64, error) {
	return sumPerCPU(f.maps.Errors, 0)
}

func sumPerCPU(m *ebpf.Map, key uint32) (uint64, error) {
	var percpu []uint64
	if err := m.Lookup(key, &percpu); err != nil {
		return 0, fmt.Errorf("read error counter %d: %w", key, err)
	}
	var n uint64
	for _, v := range percpu {
		n += v
	}
	return n, nil
}

// Programs returns the attached programs by attach point.
func (f *Faults) Programs() map[string]*ebpf.Program {
	return map[string]*ebpf.Program{
		"page_fault_user":   f.progs.FaultsUser,
		"page_fault_kernel": f.progs.FaultsKernel,
	}
}

// Close detaches the program and frees its maps.
func (f *Faults) Close() error {
	var errs []error
	for _, l := range f.links {
		errs = append(errs, l.Close())
	}
	f.links = nil
	errs = append(errs, f.progs.Close(), f.maps.Close())
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("faults: close: %w", err)
	}
	return nil
}

// ReadProcFaults reads minflt and majflt of process pid (all its threads,
// live and exited) from procRoot/PID/stat.
func ReadProcFaults(procRoot string, pid int) (minor, major uint64, err error) {
	b, err := os.ReadFile(filepath.Join(procRoot, strconv.Itoa(pid), "stat"))
	if err != nil {
		return 0, 0, err
	}
	// comm may hold spaces and parentheses: fields start after the last ')'.
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0, 0, fmt.Errorf("%s/%d/stat: no ')'", procRoot, pid)
	}
	f := strings.Fields(string(b[i+1:]))
	// After comm: state(3) ppid pgrp session tty_nr tpgid flags minflt(10)
	// cminflt majflt(12); f[0] is field 3.
	if len(f) < 10 {
		return 0, 0, fmt.Errorf("%s/%d/stat: %d fields", procRoot, pid, len(f))
	}
	if minor, err = strconv.ParseUint(f[7], 10, 64); err != nil {
		return 0, 0, fmt.Errorf("%s/%d/stat minflt: %w", procRoot, pid, err)
	}
	if major, err = strconv.ParseUint(f[9], 10, 64); err != nil {
		return 0, 0, fmt.Errorf("%s/%d/stat majflt: %w", procRoot, pid, err)
	}
	return minor, major, nil
}
