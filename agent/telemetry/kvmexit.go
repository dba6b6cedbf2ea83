//go:build linux

package telemetry

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// KVMExits is the loaded and attached VM-exit counter (bpf/kvmexit.bpf.c,
// tp_btf/kvm_exit). It counts exits per tracked vCPU thread; the exit
// reason is not available to it on this kernel (see the C file). Under TCG
// there are no KVM exits and the counts stay 0.
type KVMExits struct {
	maps  kvmexitMaps
	prog  *ebpf.Program
	links []link.Link
	ncpu  int
}

// LoadKVMExits loads and attaches the program; it fails (and the caller
// should degrade) where the kernel has no kvm_exit tracepoint BTF.
func LoadKVMExits() (*KVMExits, error) { return LoadKVMExitsPinned("") }

// LoadKVMExitsPinned is LoadKVMExits with its maps and links pinned under
// pinRoot (see pin.go); "" pins nothing.
func LoadKVMExitsPinned(pinRoot string) (*KVMExits, error) {
	dir, err := pinDir(pinRoot, ProbeKVMExit, _KvmexitBytes)
	if err != nil {
		return nil, fmt.Errorf("kvmexit: %w", err)
	}
	spec, err := loadKvmexit()
	if err != nil {
		return nil, fmt.Errorf("kvmexit: parse embedded object: %w", err)
	}
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		return nil, fmt.Errorf("kvmexit: possible CPUs: %w", err)
	}
	var objs kvmexitObjects
	if err := spec.LoadAndAssign(&objs, pinOptions(spec, dir)); err != nil {
		return nil, fmt.Errorf("kvmexit: load: %w", verifierDetail(err))
	}
	k := &KVMExits{maps: objs.kvmexitMaps, prog: objs.KvmexitExit, ncpu: ncpu}
	l, err := attach(dir, "kvm_exit", k.prog)
	if err != nil {
		return nil, errors.Join(fmt.Errorf("kvmexit: attach tp_btf/kvm_exit: %w", err), k.Close())
	}
	k.links = append(k.links, l)
	return k, nil
}

// Track starts counting the exits of vCPU thread tid.
func (k *KVMExits) Track(tid, vcpuSlot uint32) error {
	zero := make([]uint64, k.ncpu)
	if err := k.maps.Exits.Update(tid, zero, ebpf.UpdateNoExist); err != nil && !errors.Is(err, ebpf.ErrKeyExist) {
		return fmt.Errorf("kvmexit: track %d: %w", tid, err)
	}
	if err := k.maps.Vcpus.Update(tid, vcpuSlot, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("kvmexit: track %d: %w", tid, err)
	}
	return nil
}

// Untrack stops counting tid and drops its counter.
func (k *KVMExits) Untrack(tid uint32) error {
	return deleteKeys("kvmexit", tid, k.maps.Vcpus, k.maps.Exits)
}

// Read returns the exit count of every tracked thread.
func (k *KVMExits) Read() (map[uint32]uint64, error) {
	out := make(map[uint32]uint64)
	var (
		tid    uint32
		percpu []uint64
	)
	it := k.maps.Exits.Iterate()
	for it.Next(&tid, &percpu) {
		var n uint64
		for _, v := range percpu {
			n += v
		}
		out[tid] = n
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("kvmexit: read: %w", err)
	}
	return out, nil
}

// Programs returns the attached program by attach point.
func (k *KVMExits) Programs() map[string]*ebpf.Program {
	return map[string]*ebpf.Program{"kvm_exit": k.prog}
}

// Close detaches the program and frees its maps.
func (k *KVMExits) Close() error {
	var errs []error
	for _, l := range k.links {
		errs = append(errs, l.Close())
	}
	k.links = nil
	errs = append(errs, closeProg(k.prog), k.maps.Close())
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("kvmexit: close: %w", err)
	}
	return nil
}
