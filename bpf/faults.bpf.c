//go:build ignore

// faults: page-fault exceptions per tracked process (a VM's QEMU), from
// tp_btf/page_fault_user (faults taken in user mode) and
// tp_btf/page_fault_kernel (taken in kernel mode, e.g. copy_from_user on a
// guest buffer).
//
// Why not fexit/handle_mm_fault, which would see VM_FAULT_MAJOR and count
// minor/major exactly as the kernel's mm_account_fault: on these hosts the
// kernel is locked down (lockdown LSM, "Kernel is locked down from Kernel
// configuration") and every fentry/fexit load fails with EPERM (checked on
// handle_mm_fault, __handle_mm_fault, filemap_fault, vfs_read), and kprobes
// are not built. No tracepoint reports the fault's outcome, so the minor /
// major split comes from the kernel's own per-process counters
// (/proc/PID/stat minflt/majflt, read once per tick, exact); these programs
// give the in-kernel fault rate by mode. Faults KVM takes through
// get_user_pages (no exception) are in minflt but not here.
//
// Maps:
//   procs   HASH tgid -> vm_slot           the agent (TrackProcess)
//   faults  PERCPU_HASH tgid -> fault_stats created zeroed by the agent,
//                                          added to in place here
//   errors  PERCPU_ARRAY kind -> u64
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define MAX_PROCS 1024

struct fault_stats {
	__u64 user;   // page_fault_user
	__u64 kernel; // page_fault_kernel
};

enum faults_err {
	FAULTS_ERR_NO_STATS = 0, // tracked tgid without stats entry
	FAULTS_ERR_MAX = 1,
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PROCS);
	__type(key, __u32);
	__type(value, __u32);
} procs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MAX_PROCS);
	__type(key, __u32);
	__type(value, struct fault_stats);
} faults SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FAULTS_ERR_MAX);
	__type(key, __u32);
	__type(value, __u64);
} errors SEC(".maps");

static __always_inline void count_fault(bool user)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;

	if (!bpf_map_lookup_elem(&procs, &tgid))
		return; // untracked: nothing else read or written
	struct fault_stats *fs = bpf_map_lookup_elem(&faults, &tgid);
	if (!fs) {
		__u32 k = FAULTS_ERR_NO_STATS;
		__u64 *n = bpf_map_lookup_elem(&errors, &k);
		if (n)
			*n += 1;
		return;
	}
	if (user)
		fs->user++;
	else
		fs->kernel++;
}

SEC("tp_btf/page_fault_user")
int BPF_PROG(faults_user, unsigned long address, struct pt_regs *regs, unsigned long error_code)
{
	count_fault(true);
	return 0;
}

SEC("tp_btf/page_fault_kernel")
int BPF_PROG(faults_kernel, unsigned long address, struct pt_regs *regs, unsigned long error_code)
{
	count_fault(false);
	return 0;
}
