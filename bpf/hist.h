// Log2 latency histogram helpers shared by ARS's BPF programs.
#ifndef ARS_HIST_H
#define ARS_HIST_H

// HIST_SLOTS buckets of nanoseconds: slot 0 holds [0, 2), slot i (1 <= i <
// HIST_SLOTS-1) holds [2^i, 2^(i+1)), the last slot holds everything from
// 2^(HIST_SLOTS-1) ns (about 2.1 s) up.
#define HIST_SLOTS 32

// log2_u64 is floor(log2(v)) for v > 0 and 0 for v == 0, branch-light so the
// verifier sees a bounded result.
static __always_inline __u32 log2_u64(__u64 v)
{
	__u32 r = 0, shift;

	shift = (v > 0xFFFFFFFFULL) << 5; v >>= shift; r |= shift;
	shift = (v > 0xFFFF) << 4; v >>= shift; r |= shift;
	shift = (v > 0xFF) << 3; v >>= shift; r |= shift;
	shift = (v > 0xF) << 2; v >>= shift; r |= shift;
	shift = (v > 0x3) << 1; v >>= shift; r |= shift;
	r |= (__u32)(v >> 1);
	return r;
}

// hist_slot maps a delay in ns to its histogram slot, clamped to the last.
static __always_inline __u32 hist_slot(__u64 ns)
{
	__u32 s = log2_u64(ns);

	return s < HIST_SLOTS ? s : HIST_SLOTS - 1;
}

#endif
