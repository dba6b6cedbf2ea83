//go:build ignore

// runqlat: run-queue delay (wakeup or preemption -> on-CPU) of the threads
// the agent tracks (vCPU threads), aggregated in the kernel per thread.
//
// Maps and who writes them:
//   tracked  HASH tid -> struct tracked_vcpu   the agent (Track/Untrack)
//   state    HASH tid -> struct thread_state   created zeroed by Track,
//                                              updated in place here
//   stats    PERCPU_HASH tid -> vcpu_stats     created zeroed by Track,
//                                              added to in place here
//   errors   PERCPU_ARRAY kind -> u64          failures counted here
// The programs never create or delete map entries, so they cannot fail a
// map update; what can fail is finding a tracked thread's entries (a race
// with Track/Untrack), counted in errors.
//
// An untracked task costs one hash lookup per task in the event, then
// return: no clock read and no map write.
//
// Semantics follow the kernel's schedstat (kernel/sched/stats.h) so the
// numbers can be checked against /proc/TID/schedstat:
//   - a wait starts at wakeup (sched_wakeup[_new]; an earlier start is
//     kept), or at switch-out when the task is still TASK_RUNNING
//     (preempted: it stays on the run queue);
//   - a wait ends at switch-in; delay = switch-in - wait start;
//   - a switch-out in any other state clears the wait start (a wakeup that
//     came while the task was still on the CPU is not a wait).

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#include "hist.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define MAX_TRACKED 4096
#define TASK_RUNNING 0

// Agent-owned: which threads we account for, and what they belong to.
struct tracked_vcpu {
	__u32 vm_slot;
	__u32 vcpu_slot;
};

// Kernel-owned per-thread timestamps (global, not per-CPU: a thread can be
// woken on one CPU and switched in on another; every access happens under
// the run-queue lock of the queue holding the thread, so no atomics).
struct thread_state {
	__u64 enqueued_ns;    // wait start, 0 when not waiting
	__u64 oncpu_since_ns; // last switch-in, 0 when not running
};

// Per-CPU, per-thread aggregate; the agent sums over CPUs.
struct vcpu_stats {
	__u64 run_delay_ns; // sum of run-queue delays
	__u64 count;        // number of delays summed (switch-ins with a known wait start)
	__u64 oncpu_ns;     // sum of switch-in -> switch-out
	__u64 involuntary;  // switch-outs while still runnable (= nonvoluntary_ctxt_switches)
	__u64 wakeups;      // sched_wakeup + sched_wakeup_new
	__u64 hist[HIST_SLOTS]; // log2 histogram of delay ns, see hist_slot
};

enum runqlat_err {
	RUNQLAT_ERR_NO_STATE = 0, // tracked tid without state entry
	RUNQLAT_ERR_NO_STATS = 1, // tracked tid without stats entry
	RUNQLAT_ERR_CLOCK = 2,    // switch-in earlier than wait start (dropped)
	RUNQLAT_ERR_RINGBUF = 3,  // spike event dropped: ring buffer full
	RUNQLAT_ERR_MAX = 4,
};

// A run-queue delay of a tracked thread at or above spike_threshold_ns,
// sent through the spikes ring buffer so the agent can act before its
// next tick.
struct spike_event {
	__u64 ts_ns;    // switch-in, bpf_ktime_get_ns (CLOCK_MONOTONIC)
	__u64 delay_ns;
	__u32 tid;
	__u32 vm_slot;
	__u32 vcpu_slot;
	__u32 pad;
};

// Makes the type visible in BTF for bpf2go's -type.
const struct spike_event *unused_spike_event __attribute__((unused));

// Set by the agent at run time (SetSpikeThreshold); 0 disables spikes.
volatile __u64 spike_threshold_ns = 0;

// Input of the BPF_PROG_TEST_RUN program test_hist_slot.
struct hist_slot_test {
	__u64 delay_ns;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_TRACKED);
	__type(key, __u32);
	__type(value, struct tracked_vcpu);
} tracked SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_TRACKED);
	__type(key, __u32);
	__type(value, struct thread_state);
} state SEC(".maps");

// PERCPU_HASH keyed by tid rather than a PERCPU_ARRAY indexed by
// vcpu_slot: the key is the one the agent already has (no slot allocator,
// no stale slot reuse), Untrack deletes one key, and the cost is one more
// hash lookup per event of a tracked thread only (measured under
// stress-ng --switch: sched_switch 228 ns/run tracked, 96 untracked, 51 for
// an empty program).
// BPF_F_NO_PREALLOC: values are (NR_CPUS x 296 bytes); preallocating
// MAX_TRACKED of them would take ~150 MB on a 128-CPU host. Entries are
// only created by the agent (Track), never here, so allocation never
// happens in scheduler context.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MAX_TRACKED);
	__type(key, __u32);
	__type(value, struct vcpu_stats);
} stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 * 1024);
} spikes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RUNQLAT_ERR_MAX);
	__type(key, __u32);
	__type(value, __u64);
} errors SEC(".maps");

// Kernels before 5.14 call the field "state".
struct task_struct___pre514 {
	long state;
} __attribute__((preserve_access_index));

// tp_btf arguments are BTF pointers: plain loads, CO-RE relocated through
// vmlinux.h's preserve_access_index, cost no helper call.
static __always_inline long task_run_state(struct task_struct *t)
{
	if (bpf_core_field_exists(t->__state))
		return t->__state;
	return ((struct task_struct___pre514 *)t)->state;
}

static __always_inline void count_error(__u32 kind)
{
	__u64 *n = bpf_map_lookup_elem(&errors, &kind);
	if (n)
		*n += 1;
}

// lookup_tracked returns the thread's state and this CPU's stats entry, or
// 0 when the thread is not tracked (or its entries are missing, counted).
static __always_inline int lookup_tracked(__u32 tid, struct thread_state **st,
					  struct vcpu_stats **vs)
{
	*st = bpf_map_lookup_elem(&state, &tid);
	if (!*st) {
		count_error(RUNQLAT_ERR_NO_STATE);
		return 0;
	}
	*vs = bpf_map_lookup_elem(&stats, &tid);
	if (!*vs) {
		count_error(RUNQLAT_ERR_NO_STATS);
		return 0;
	}
	return 1;
}

// clock_or returns fixed when set (BPF_PROG_TEST_RUN drives the logic with
// chosen times), else the clock. The attached programs pass a constant 0,
// so the branch folds away.
static __always_inline __u64 clock_or(__u64 fixed)
{
	return fixed ? fixed : bpf_ktime_get_ns();
}

// handle_wakeup returns 0 for an untracked tid, before any clock read or
// map write, 1 otherwise.
static __always_inline int handle_wakeup(__u32 tid, __u64 fixed_now)
{
	struct thread_state *st;
	struct vcpu_stats *vs;

	if (!bpf_map_lookup_elem(&tracked, &tid))
		return 0; // untracked: nothing read, nothing written
	if (!lookup_tracked(tid, &st, &vs))
		return 1;
	// Keep the earliest start, as schedstat does (a wakeup of a task that
	// is already queued does not restart its wait).
	if (!st->enqueued_ns)
		st->enqueued_ns = clock_or(fixed_now);
	vs->wakeups++;
	return 1;
}

SEC("tp_btf/sched_wakeup")
int BPF_PROG(runqlat_wakeup, struct task_struct *p)
{
	handle_wakeup(p->pid, 0);
	return 0;
}

SEC("tp_btf/sched_wakeup_new")
int BPF_PROG(runqlat_wakeup_new, struct task_struct *p)
{
	handle_wakeup(p->pid, 0);
	return 0;
}

static __always_inline void switch_out(__u32 tid, bool preempt, long run_state, __u64 now)
{
	struct thread_state *st;
	struct vcpu_stats *vs;

	if (!lookup_tracked(tid, &st, &vs))
		return;
	if (st->oncpu_since_ns && now > st->oncpu_since_ns)
		vs->oncpu_ns += now - st->oncpu_since_ns;
	st->oncpu_since_ns = 0;

	// Counted like the kernel's nivcsw: preempted, or still runnable.
	if (preempt || run_state == TASK_RUNNING)
		vs->involuntary++;
	// Still TASK_RUNNING: it stays queued and its wait starts now.
	// Otherwise it blocks; a later wakeup starts the wait.
	st->enqueued_ns = run_state == TASK_RUNNING ? now : 0;
}

static __noinline void emit_spike(__u32 tid, __u64 delay, __u64 now)
{
	struct tracked_vcpu *tv = bpf_map_lookup_elem(&tracked, &tid);
	struct spike_event *e;

	if (!tv)
		return;
	e = bpf_ringbuf_reserve(&spikes, sizeof(*e), 0);
	if (!e) {
		count_error(RUNQLAT_ERR_RINGBUF);
		return;
	}
	e->ts_ns = now;
	e->delay_ns = delay;
	e->tid = tid;
	e->vm_slot = tv->vm_slot;
	e->vcpu_slot = tv->vcpu_slot;
	e->pad = 0;
	bpf_ringbuf_submit(e, 0);
}

static __always_inline void switch_in(__u32 tid, __u64 now)
{
	struct thread_state *st;
	struct vcpu_stats *vs;

	if (!lookup_tracked(tid, &st, &vs))
		return;
	__u64 start = st->enqueued_ns;
	st->enqueued_ns = 0;
	st->oncpu_since_ns = now;
	// No known start: tracked while queued, or preempted while not
	// TASK_RUNNING (schedstat counts no wait for that either).
	if (!start)
		return;
	if (now < start) {
		count_error(RUNQLAT_ERR_CLOCK);
		return;
	}
	__u64 delay = now - start;
	vs->run_delay_ns += delay;
	vs->count++;
	vs->hist[hist_slot(delay)]++;

	__u64 threshold = spike_threshold_ns;
	if (threshold && delay >= threshold)
		emit_spike(tid, delay, now);
}

// handle_switch returns 0 when neither task is tracked, before any clock
// read, task read or map write; 1 otherwise. prev is the outgoing task
// (its run state is read only when it is tracked); without it (tests)
// prev_state is used.
static __always_inline int handle_switch(bool preempt, __u32 prev_tid, struct task_struct *prev,
					 long prev_state, __u32 next_tid, __u64 fixed_now)
{
	bool prev_tracked = prev_tid && bpf_map_lookup_elem(&tracked, &prev_tid);
	bool next_tracked = next_tid && bpf_map_lookup_elem(&tracked, &next_tid);

	if (!prev_tracked && !next_tracked)
		return 0; // untracked: nothing read, nothing written

	__u64 now = clock_or(fixed_now);
	if (prev_tracked)
		switch_out(prev_tid, preempt, prev ? task_run_state(prev) : prev_state, now);
	if (next_tracked)
		switch_in(next_tid, now);
	return 1;
}

SEC("tp_btf/sched_switch")
int BPF_PROG(runqlat_switch, bool preempt, struct task_struct *prev,
	     struct task_struct *next)
{
	handle_switch(preempt, prev->pid, prev, 0, next->pid, 0);
	return 0;
}

// Input of the BPF_PROG_TEST_RUN program test_sched: one scheduler event
// at a chosen time.
struct sched_test {
	__u64 now_ns;     // event time, > 0
	__u32 op;         // 0 wakeup of tid, 1 switch prev_tid -> next_tid
	__u32 tid;
	__u32 prev_tid;
	__u32 next_tid;
	__s32 prev_state; // 0 TASK_RUNNING (preempted), else blocking
	__u32 preempt;
};

// test_sched drives the programs' logic (handle_wakeup, handle_switch) on
// the real maps through BPF_PROG_TEST_RUN; it returns what they return
// (0: early exit for untracked tasks). Never attached, not loaded by the
// agent.
SEC("syscall")
int test_sched(struct sched_test *ctx)
{
	if (ctx->op == 0)
		return handle_wakeup(ctx->tid, ctx->now_ns);
	return handle_switch(ctx->preempt, ctx->prev_tid, 0, ctx->prev_state, ctx->next_tid, ctx->now_ns);
}

// test_hist_slot exposes hist_slot to BPF_PROG_TEST_RUN; it is never
// attached and the agent does not load it.
SEC("syscall")
int test_hist_slot(struct hist_slot_test *ctx)
{
	return hist_slot(ctx->delay_ns);
}

// test_empty_switch is the baseline for cost measurements: the same attach
// point with no work. Benchmarks load it; the agent does not.
SEC("tp_btf/sched_switch")
int BPF_PROG(test_empty_switch)
{
	return 0;
}
