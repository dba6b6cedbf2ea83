//go:build ignore

// blockio: block request latency, requests and bytes by direction per
// tracked process (a VM's QEMU).
//
// A request is attributed when it is created: tp_btf/block_io_start fires
// in blk_mq_bio_to_request, in the context of the thread that submitted the
// bio. block_rq_issue (which may run in a kworker when the queue is
// plugged or requeued) and block_rq_complete (in interrupt context) only
// look the request up by address. Latency is issue -> final completion, as
// biolatency measures it (the device's service time, queueing excluded).
//
// Maps:
//   procs     HASH tgid -> vm_slot              the agent (TrackProcess)
//   inflight  HASH struct request * -> rq_info  created at block_io_start
//                                               of a tracked process,
//                                               deleted at final completion
//   io        PERCPU_HASH tgid -> io_stats      created zeroed by the agent
//   errors    PERCPU_ARRAY kind -> u64
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

#include "hist.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define MAX_PROCS 1024
#define MAX_INFLIGHT 8192
#define ARS_REQ_OP_MASK 0xff
#define IO_DIRS 3 // 0 read, 1 write, 2 other (flush, discard, ...)

struct rq_info {
	__u64 issue_ns; // 0 until issued
	__u32 tgid;
	__u32 pad;
};

struct io_stats {
	__u64 requests[IO_DIRS];
	__u64 bytes[IO_DIRS];
	__u64 latency_ns[IO_DIRS];
	__u64 hist[IO_DIRS][HIST_SLOTS];
};

enum blockio_err {
	BLOCKIO_ERR_INFLIGHT_FULL = 0, // inflight map full: request not followed
	BLOCKIO_ERR_NO_STATS = 1,      // tracked tgid without stats entry
	BLOCKIO_ERR_NOT_ISSUED = 2,    // completed without issue seen
	BLOCKIO_ERR_MAX = 3,
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PROCS);
	__type(key, __u32);
	__type(value, __u32);
} procs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_INFLIGHT);
	__type(key, __u64);
	__type(value, struct rq_info);
} inflight SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MAX_PROCS);
	__type(key, __u32);
	__type(value, struct io_stats);
} io SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, BLOCKIO_ERR_MAX);
	__type(key, __u32);
	__type(value, __u64);
} errors SEC(".maps");

static __always_inline void count_error(__u32 kind)
{
	__u64 *n = bpf_map_lookup_elem(&errors, &kind);
	if (n)
		*n += 1;
}

static __always_inline __u32 io_dir(__u32 cmd_flags)
{
	__u32 op = cmd_flags & ARS_REQ_OP_MASK;

	if (op == REQ_OP_READ)
		return 0;
	if (op == REQ_OP_WRITE)
		return 1;
	return 2;
}

SEC("tp_btf/block_io_start")
int BPF_PROG(blockio_start, struct request *rq)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;

	if (!bpf_map_lookup_elem(&procs, &tgid))
		return 0; // untracked: nothing else read or written
	__u64 key = (__u64)rq;
	struct rq_info info = {.tgid = tgid};
	if (bpf_map_update_elem(&inflight, &key, &info, BPF_ANY))
		count_error(BLOCKIO_ERR_INFLIGHT_FULL);
	return 0;
}

SEC("tp_btf/block_rq_issue")
int BPF_PROG(blockio_issue, struct request *rq)
{
	__u64 key = (__u64)rq;
	struct rq_info *info = bpf_map_lookup_elem(&inflight, &key);

	if (!info)
		return 0;
	info->issue_ns = bpf_ktime_get_ns();
	return 0;
}

SEC("tp_btf/block_rq_complete")
int BPF_PROG(blockio_complete, struct request *rq, blk_status_t error, unsigned int nr_bytes)
{
	__u64 key = (__u64)rq;
	struct rq_info *info = bpf_map_lookup_elem(&inflight, &key);

	if (!info)
		return 0;
	__u32 tgid = info->tgid;
	__u64 issued = info->issue_ns;
	// blk_update_request fires this before taking nr_bytes off the
	// request: the request is done when nr_bytes covers what is left.
	bool final = nr_bytes >= rq->__data_len;
	__u32 dir = io_dir(rq->cmd_flags);
	struct io_stats *st = bpf_map_lookup_elem(&io, &tgid);
	if (!st) {
		count_error(BLOCKIO_ERR_NO_STATS);
		if (final)
			bpf_map_delete_elem(&inflight, &key);
		return 0;
	}
	st->bytes[dir] += nr_bytes;
	if (!final)
		return 0;
	bpf_map_delete_elem(&inflight, &key);
	st->requests[dir]++;
	if (!issued) {
		count_error(BLOCKIO_ERR_NOT_ISSUED);
		return 0;
	}
	__u64 now = bpf_ktime_get_ns();
	__u64 lat = now > issued ? now - issued : 0;
	st->latency_ns[dir] += lat;
	st->hist[dir][hist_slot(lat)]++;
	return 0;
}
