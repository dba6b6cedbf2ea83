//go:build ignore

// kvmexit: VM exits per tracked vCPU thread, from tp_btf/kvm_exit (KVM is
// built into this kernel's vmlinux, so its tracepoint has vmlinux BTF).
//
// The exit reason is not among the tracepoint's arguments (the kernel's
// TP_fast_assign asks the vendor module through kvm_x86_ops.get_exit_info,
// which a BPF program cannot call) and the vendor structs (vcpu_vmx,
// vcpu_svm) are not in vmlinux BTF, so exits are counted per thread and
// per ISA (0 = VMX/SVM as passed by the tracepoint), not per reason yet.
// Under TCG there are no KVM exits: the program is only loaded and attached.
//
//   vcpus  HASH tid -> vcpu_slot           the agent
//   exits  PERCPU_HASH tid -> u64 count    created zeroed by the agent
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define MAX_VCPUS 4096

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_VCPUS);
	__type(key, __u32);
	__type(value, __u32);
} vcpus SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MAX_VCPUS);
	__type(key, __u32);
	__type(value, __u64);
} exits SEC(".maps");

SEC("tp_btf/kvm_exit")
int BPF_PROG(kvmexit_exit, struct kvm_vcpu *vcpu, __u32 isa)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();

	if (!bpf_map_lookup_elem(&vcpus, &tid))
		return 0;
	__u64 *n = bpf_map_lookup_elem(&exits, &tid);
	if (n)
		*n += 1;
	return 0;
}
