package cgroup

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/ars-dev/ars/agent/cgroups"
)

// Errors callers (the executor) branch on. Every returned error wraps one.
var (
	// ErrInvalid: a value failed validation; nothing was written.
	ErrInvalid = errors.New("cgroup: invalid value")
	// ErrBelowUsage: a memory limit below usage + margin; nothing was written.
	ErrBelowUsage = errors.New("cgroup: memory limit below usage plus margin")
	// ErrUnavailable: the controller is not available for this target.
	ErrUnavailable = errors.New("cgroup: controller unavailable")
	// ErrVanished: the cgroup directory does not exist (VM gone).
	ErrVanished = errors.New("cgroup: cgroup vanished")
	// ErrReclaimTimeout: v2 staging: usage did not fall under memory.high in
	// time; memory.max was not written and memory.high was restored.
	ErrReclaimTimeout = errors.New("cgroup: memory did not shrink under memory.high in time")
)

// Limits the kernel enforces (kernel/sched/core.c, cgroup-v2.rst).
const (
	MinQuotaUs  = 1000
	MinPeriodUs = 1000
	MaxPeriodUs = 1_000_000
	MinShares   = 2
	MaxShares   = 262144
	MinWeight   = 1
	MaxWeight   = 10000
	// MinMargin is the least headroom kept above memory usage.
	MinMargin = 64 << 20
)

// Dir is one controller's directory of a VM's cgroup.
type Dir struct {
	Path    string          // absolute directory of the cgroup
	Mount   string          // the hierarchy's mount point (v1 controller or cgroup2)
	Version cgroups.Version // None when the controller is not available
}

func (d Dir) rel() (string, error) {
	r, err := filepath.Rel(d.Mount, d.Path)
	if err != nil || strings.HasPrefix(r, "..") {
		return "", fmt.Errorf("%w: %s is not under mount %s", ErrInvalid, d.Path, d.Mount)
	}
	return "/" + filepath.ToSlash(r), nil
}

// Target names a VM's cgroup directory per controller. On v1 each is a
// different directory; on v2 all are the same unified directory.
type Target struct {
	Name   string // for messages and the fake; usually the VM name
	CPU    Dir
	Cpuset Dir
	Memory Dir
	BlkIO  Dir
}

// TargetFor builds a Target from a cgroup membership (as in /proc/PID/cgroup,
// or cgroups.Owned.Rel), detecting the version of each controller.
func TargetFor(h *cgroups.Host, name string, m cgroups.Membership) Target {
	t := Target{Name: name}
	dir := func(v1, v2 string) Dir {
		for _, c := range []string{v1, v2} {
			switch h.VersionOf(c) {
			case cgroups.V1:
				if p, err := h.Dir(m, c); err == nil {
					return Dir{Path: p, Mount: h.V1[c], Version: cgroups.V1}
				}
			case cgroups.V2:
				if p, err := h.Dir(m, c); err == nil {
					return Dir{Path: p, Mount: h.Unified, Version: cgroups.V2}
				}
			}
		}
		return Dir{}
	}
	t.CPU = dir("cpu", "cpu")
	t.Cpuset = dir("cpuset", "cpuset")
	t.Memory = dir("memory", "memory")
	t.BlkIO = dir("blkio", "io")
	return t
}

// IOLimit is a per-device block I/O throttle; 0 means unlimited.
type IOLimit struct {
	RBps, WBps, RIOPS, WIOPS uint64
}

// Memory is a memory setting; -1 means unlimited.
type Memory struct {
	// Max is the hard limit: v1 memory.limit_in_bytes, v2 memory.max.
	Max int64
	// Soft is v1 memory.soft_limit_in_bytes (reclaim target under global
	// pressure) and v2 memory.high (throttle point). -1: none. Must be ≤ Max.
	Soft int64
}

// State is what the kernel files say for a target. Fields of unavailable
// controllers are zero.
type State struct {
	QuotaUs  int64  // -1 unlimited
	PeriodUs uint64 //
	Weight   uint64 // v2 units (v1: converted from Shares)
	Shares   uint64 // v1 only
	Cpus     string // configured cpuset.cpus
	Mems     string
	MemMax   int64 // -1 unlimited
	MemSoft  int64 // v1 soft limit or v2 memory.high; -1 unlimited
	MemUsage int64
	IO       map[string]IOLimit // by "MAJ:MIN"
}

// Writer is the cgroup actuator. Implementations: Real, Fake.
type Writer interface {
	SetCPU(ctx context.Context, t Target, quotaUs int64, periodUs uint64) error
	SetCPUWeight(ctx context.Context, t Target, weight uint64) error
	SetCpuset(ctx context.Context, t Target, cpus, mems string) error
	SetMemory(ctx context.Context, t Target, m Memory) error
	SetBlockIO(ctx context.Context, t Target, dev string, l IOLimit) error
	Read(ctx context.Context, t Target) (State, error)
}

// ValidateCPU checks a quota (-1 = unlimited) and period in µs.
func ValidateCPU(quotaUs int64, periodUs uint64) error {
	if quotaUs != -1 && quotaUs < MinQuotaUs {
		return fmt.Errorf("%w: cpu quota %d µs (want -1 or ≥ %d)", ErrInvalid, quotaUs, MinQuotaUs)
	}
	if periodUs < MinPeriodUs || periodUs > MaxPeriodUs {
		return fmt.Errorf("%w: cpu period %d µs (want %d..%d)", ErrInvalid, periodUs, MinPeriodUs, MaxPeriodUs)
	}
	return nil
}

// ValidateWeight checks a v2 cpu.weight.
func ValidateWeight(w uint64) error {
	if w < MinWeight || w > MaxWeight {
		return fmt.Errorf("%w: cpu weight %d (want %d..%d)", ErrInvalid, w, MinWeight, MaxWeight)
	}
	return nil
}

// WeightToShares converts a v2 weight to v1 shares (systemd's rule:
// shares = weight*1024/100, clamped to 2..262144; 100 ↔ 1024).
func WeightToShares(w uint64) uint64 {
	s := w * 1024 / 100
	return min(max(s, MinShares), MaxShares)
}

// SharesToWeight converts v1 shares to a v2 weight (weight = shares*100/1024,
// clamped to 1..10000). WeightToShares(SharesToWeight(s)) ≈ s within 1 %.
func SharesToWeight(s uint64) uint64 {
	w := s * 100 / 1024
	return min(max(w, MinWeight), MaxWeight)
}

// ParseList parses a kernel list ("0-3,5,7-8"); "" is the empty set.
func ParseList(s string) (map[int]bool, error) {
	set := map[int]bool{}
	s = strings.TrimSpace(s)
	if s == "" {
		return set, nil
	}
	for _, part := range strings.Split(s, ",") {
		lo, hi, isRange := strings.Cut(part, "-")
		a, err := strconv.Atoi(lo)
		if err != nil || a < 0 {
			return nil, fmt.Errorf("%w: list %q: bad element %q", ErrInvalid, s, part)
		}
		b := a
		if isRange {
			if b, err = strconv.Atoi(hi); err != nil || b < a {
				return nil, fmt.Errorf("%w: list %q: bad range %q", ErrInvalid, s, part)
			}
		}
		if b-a > 1<<16 {
			return nil, fmt.Errorf("%w: list %q: range too large", ErrInvalid, s)
		}
		for i := a; i <= b; i++ {
			set[i] = true
		}
	}
	return set, nil
}

// FormatList renders a set in the kernel's list form.
func FormatList(set map[int]bool) string {
	var ids []int
	for i := range set {
		ids = append(ids, i)
	}
	sort.Ints(ids)
	var parts []string
	for i := 0; i < len(ids); {
		j := i
		for j+1 < len(ids) && ids[j+1] == ids[j]+1 {
			j++
		}
		if i == j {
			parts = append(parts, strconv.Itoa(ids[i]))
		} else {
			parts = append(parts, fmt.Sprintf("%d-%d", ids[i], ids[j]))
		}
		i = j + 1
	}
	return strings.Join(parts, ",")
}

// validateSubset checks list syntax, non-emptiness and want ⊆ have.
func validateSubset(what, want, have string) error {
	w, err := ParseList(want)
	if err != nil {
		return err
	}
	if len(w) == 0 {
		return fmt.Errorf("%w: empty cpuset %s", ErrInvalid, what)
	}
	h, err := ParseList(have)
	if err != nil {
		return fmt.Errorf("cgroup: parent's effective %s %q: %w", what, have, err)
	}
	extra := map[int]bool{}
	for i := range w {
		if !h[i] {
			extra[i] = true
		}
	}
	if len(extra) > 0 {
		return fmt.Errorf("%w: cpuset %s %q not within the parent's effective %q (extra %s)",
			ErrInvalid, what, want, have, FormatList(extra))
	}
	return nil
}

// Margin is the headroom a memory limit must keep above usage:
// max(64 MiB, 10 % of usage).
func Margin(usage int64) int64 { return max(MinMargin, usage/10) }

// checkAboveUsage refuses limit < usage + Margin(usage). -1 is unlimited.
func checkAboveUsage(what string, limit, usage int64) error {
	if limit < 0 {
		return nil
	}
	if need := usage + Margin(usage); limit < need {
		return fmt.Errorf("%w: %s %d B < usage %d B + margin %d B (= %d B); not written",
			ErrBelowUsage, what, limit, usage, Margin(usage), need)
	}
	return nil
}

// ValidateMemory checks the shape of m (not usage).
func ValidateMemory(m Memory) error {
	if m.Max < -1 || m.Soft < -1 || m.Max == 0 {
		return fmt.Errorf("%w: memory max %d soft %d (want -1 or > 0)", ErrInvalid, m.Max, m.Soft)
	}
	if m.Max >= 0 && m.Soft > m.Max {
		return fmt.Errorf("%w: memory soft %d above max %d", ErrInvalid, m.Soft, m.Max)
	}
	return nil
}

// ParseDevice parses "MAJ:MIN".
func ParseDevice(dev string) (major, minor int64, err error) {
	a, b, ok := strings.Cut(dev, ":")
	if ok {
		major, err = strconv.ParseInt(a, 10, 64)
		if err == nil {
			minor, err = strconv.ParseInt(b, 10, 64)
		}
	}
	if !ok || err != nil || major < 0 || minor < 0 {
		return 0, 0, fmt.Errorf("%w: block device %q (want MAJ:MIN)", ErrInvalid, dev)
	}
	return major, minor, nil
}

// validateDevice checks dev exists under sys/dev/block and is a whole disk.
func validateDevice(sys, dev string) (int64, int64, error) {
	maj, min, err := ParseDevice(dev)
	if err != nil {
		return 0, 0, err
	}
	p := filepath.Join(sys, "dev", "block", fmt.Sprintf("%d:%d", maj, min))
	if _, err := os.Stat(p); err != nil {
		return 0, 0, fmt.Errorf("%w: block device %s not in %s", ErrInvalid, dev, filepath.Dir(p))
	}
	if _, err := os.Stat(filepath.Join(p, "partition")); err == nil {
		return 0, 0, fmt.Errorf("%w: block device %s is a partition; throttles apply to whole disks", ErrInvalid, dev)
	}
	return maj, min, nil
}
