// Package mapper is the Dynamic Resource Map (DRM): the table of record of
// what each VM's virtual resources are mapped to on the host — vCPU →
// thread id, VM → cgroup and CPU quota, memory → balloon — and the open
// loans between VMs. Every change bumps a generation number. The table
// lives in memory; journal.go is the durable record of intents and
// outcomes. It is safe for concurrent use: the control loop writes, the
// control socket and metrics read.
package mapper

import (
	"fmt"
	"slices"
	"sort"
	"sync"
	"time"
)

// VCPU maps a virtual CPU to its host thread.
type VCPU struct {
	Index int `json:"index"`
	TID   int `json:"tid"`
}

// CPU is where a VM's CPU allocation lives and what it is.
type CPU struct {
	Cgroup     string `json:"cgroup"`
	Version    string `json:"version"`
	QuotaUs    int64  `json:"quota_us"`
	PeriodUs   uint64 `json:"period_us"`
	Millicores int64  `json:"millicores"`
}

// Mem is where a VM's memory allocation lives: the balloon (actual size
// and the target ARS set, both MiB, bounded by the boot memory) and the
// QEMU process's memory cgroup.
type Mem struct {
	Cgroup     string `json:"cgroup,omitempty"`
	BalloonMiB int64  `json:"balloon_mib"`
	TargetMiB  int64  `json:"target_mib"`
	MaxMiB     int64  `json:"max_mib"`
	UsedMiB    int64  `json:"used_mib"`
}

// VM is one VM's row set.
type VM struct {
	Name       string `json:"name"`
	PID        int    `json:"pid"`
	QMP        string `json:"qmp"`
	VCPUs      []VCPU `json:"vcpus"`
	CPU        CPU    `json:"cpu"`
	Mem        *Mem   `json:"mem,omitempty"` // nil: memory not managed
	Generation uint64 `json:"generation"`
}

// Loan is an amount of a resource that Lender gave up to Borrower.
type Loan struct {
	Lender   string    `json:"lender"`
	Borrower string    `json:"borrower"`
	Resource string    `json:"resource"`
	Amount   int64     `json:"amount"`
	Since    time.Time `json:"since"`
}

// Snapshot is a consistent copy of the table.
type Snapshot struct {
	Generation uint64 `json:"generation"`
	VMs        []VM   `json:"vms"`
	Loans      []Loan `json:"loans,omitempty"`
}

// Row is one key → value line of the map, for the CLI.
type Row struct {
	Key   string `json:"key"`
	Value string `json:"value"`
}

// Rows flattens the snapshot into vm/<name>/... keys.
func (s Snapshot) Rows() []Row {
	var rows []Row
	for _, vm := range s.VMs {
		p := "vm/" + vm.Name
		rows = append(rows, Row{p, fmt.Sprintf("pid=%d qmp=%s gen=%d", vm.PID, vm.QMP, vm.Generation)})
		for _, c := range vm.VCPUs {
			rows = append(rows, Row{fmt.Sprintf("%s/vcpu/%d", p, c.Index), fmt.Sprintf("tid=%d", c.TID)})
		}
		quota := "max"
		if vm.CPU.QuotaUs >= 0 {
			quota = fmt.Sprint(vm.CPU.QuotaUs)
		}
		rows = append(rows, Row{p + "/cpu", fmt.Sprintf("cgroup=%s (%s) quota_us=%s period_us=%d millicores=%d",
			vm.CPU.Cgroup, vm.CPU.Version, quota, vm.CPU.PeriodUs, vm.CPU.Millicores)})
		if m := vm.Mem; m != nil {
			rows = append(rows, Row{p + "/mem", fmt.Sprintf("cgroup=%s balloon_mib=%d target_mib=%d max_mib=%d used_mib=%d",
				m.Cgroup, m.BalloonMiB, m.TargetMiB, m.MaxMiB, m.UsedMiB)})
		}
	}
	for _, l := range s.Loans {
		rows = append(rows, Row{fmt.Sprintf("loan/%s/%s/%s", l.Resource, l.Lender, l.Borrower),
			fmt.Sprintf("amount=%d since=%s", l.Amount, l.Since.UTC().Format(time.RFC3339))})
	}
	return rows
}

// Filter keeps one VM's rows and the loans it is party to.
func (s Snapshot) Filter(name string) Snapshot {
	out := Snapshot{Generation: s.Generation}
	for _, vm := range s.VMs {
		if vm.Name == name {
			out.VMs = append(out.VMs, vm)
		}
	}
	for _, l := range s.Loans {
		if l.Lender == name || l.Borrower == name {
			out.Loans = append(out.Loans, l)
		}
	}
	return out
}

// Table is the DRM.
type Table struct {
	mu    sync.RWMutex
	gen   uint64
	vms   map[string]VM
	loans []Loan
}

// SetLoans replaces the open loans; the generation is bumped when they
// changed.
func (t *Table) SetLoans(ls []Loan) uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	if slices.Equal(t.loans, ls) {
		return t.gen
	}
	t.loans = slices.Clone(ls)
	t.gen++
	return t.gen
}

// New returns an empty table.
func New() *Table { return &Table{vms: map[string]VM{}} }

// Put records vm (replacing any row set of that name) and returns the new
// generation. A Put that changes nothing does not bump the generation.
func (t *Table) Put(vm VM) uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	old, ok := t.vms[vm.Name]
	vm.VCPUs = slices.Clone(vm.VCPUs)
	if vm.Mem != nil {
		m := *vm.Mem
		vm.Mem = &m
	}
	if ok {
		vm.Generation = old.Generation
		if equal(old, vm) {
			return t.gen
		}
	}
	t.gen++
	vm.Generation = t.gen
	t.vms[vm.Name] = vm
	return t.gen
}

func equal(a, b VM) bool {
	return a.Name == b.Name && a.PID == b.PID && a.QMP == b.QMP && a.CPU == b.CPU &&
		slices.Equal(a.VCPUs, b.VCPUs) && (a.Mem == nil) == (b.Mem == nil) && (a.Mem == nil || *a.Mem == *b.Mem)
}

// SetCPU updates a VM's CPU mapping; it errors for an unknown VM.
func (t *Table) SetCPU(name string, cpu CPU) (uint64, error) {
	t.mu.RLock()
	vm, ok := t.vms[name]
	t.mu.RUnlock()
	if !ok {
		return 0, fmt.Errorf("mapper: unknown VM %q", name)
	}
	vm.CPU = cpu
	return t.Put(vm), nil
}

// Get returns one VM's rows.
func (t *Table) Get(name string) (VM, bool) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	vm, ok := t.vms[name]
	vm.VCPUs = slices.Clone(vm.VCPUs)
	return vm, ok
}

// Remove drops a VM and bumps the generation if it existed.
func (t *Table) Remove(name string) uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, ok := t.vms[name]; ok {
		delete(t.vms, name)
		t.gen++
	}
	return t.gen
}

// Names lists the VMs in the table, sorted.
func (t *Table) Names() []string {
	t.mu.RLock()
	defer t.mu.RUnlock()
	names := make([]string, 0, len(t.vms))
	for n := range t.vms {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// Snapshot copies the table.
func (t *Table) Snapshot() Snapshot {
	t.mu.RLock()
	defer t.mu.RUnlock()
	s := Snapshot{Generation: t.gen, Loans: slices.Clone(t.loans)}
	for _, vm := range t.vms {
		vm.VCPUs = slices.Clone(vm.VCPUs)
		s.VMs = append(s.VMs, vm)
	}
	sort.Slice(s.VMs, func(i, j int) bool { return s.VMs[i].Name < s.VMs[j].Name })
	return s
}
