// Package cgroup owns ARS's cgroup actuator: the only code that writes a
// VM's cgroup resource files (CPU quota/period and weight, cpuset cpus and
// mems, memory limits, block I/O throttles) on cgroup v1 and v2, detected
// per controller. Detection and test-cgroup creation live in agent/cgroups;
// deciding what to write is the executor's job. This package validates a
// value against the kernel's rules before any write and orders multi-file
// changes so the kernel accepts each step:
//
//   - CPU quota/period (v1 cpu.cfs_quota_us + cpu.cfs_period_us): the
//     kernel checks every single write against the parent's ratio
//     (quota/period must not exceed it). Lowering the period first would
//     briefly raise the ratio (old quota / new period), so when the period
//     goes down the quota is written first; when it goes up the period is
//     written first. Either way the intermediate ratio is at most
//     max(old ratio, new ratio), so it is accepted when both ends are.
//     Unlimiting (-1) writes the quota first; limiting from unlimited writes
//     the period first. v2's cpu.max takes both in one write.
//   - Weight: callers speak v2 units (cpu.weight, 1..10000, default 100).
//     v1 cpu.shares = weight*1024/100 (systemd's conversion, so the defaults
//     100 and 1024 map onto each other), clamped to 2..262144; back:
//     weight = shares*100/1024 clamped to 1..10000.
//   - Memory: a hard limit below current usage + margin (max(64 MiB, 10 %
//     of usage)) is refused before any write: v1 would return EBUSY after
//     reclaim, v2 would OOM-kill the guest. On v2 a lowering is staged:
//     memory.high first, wait (bounded) for memory.current to fall under
//     it, then memory.max, then memory.high to its final value; a raise
//     writes memory.max first and then memory.high.
//   - cpuset: list syntax is checked and the set must be a subset of the
//     parent's effective cpus/mems.
//   - Block I/O: the device MAJ:MIN must exist in /sys/dev/block and be a
//     whole disk (the kernel rejects partitions).
//
// Writes go through github.com/containerd/cgroups/v3 (cgroup1.Load with a
// static path and only the one subsystem needed; cgroup2.Load + Update).
// The library writes every non-nil field of a resource struct in its own
// fixed order (v1 cpu: period before quota), so each step of an ordered
// change is a separate Update carrying one field. Reads are plain file
// reads: the library's Stat gathers statistics, not the configured limits.
// On v1 the library's cpuset Update also fills an empty cpuset.cpus/mems of
// the target's ancestors from their parents (v1 needs them non-empty).
//
// Not handled (the kernel's error is returned as is): v1 quota changes
// that would drop below a child cgroup's own ratio (the kernel checks
// children too, so the "quota first" step can be refused when children
// hold limits); a v1 memory limit above a limited memory.memsw.limit_in_bytes;
// cpuset changes that would strand a child's cpus. The usage check uses
// total usage (page cache included), which is conservative.
package cgroup
