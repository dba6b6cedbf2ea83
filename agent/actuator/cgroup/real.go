package cgroup

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/cgroups/v3/cgroup1"
	"github.com/containerd/cgroups/v3/cgroup2"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/ars-dev/ars/agent/cgroups"
)

// Paths are the host roots Real reads.
type Paths struct {
	Sys string // usually /sys (for /sys/dev/block)
}

// Real writes real cgroup files through containerd/cgroups/v3.
type Real struct {
	paths Paths
	// ReclaimWait bounds the v2 wait for memory.current to fall under
	// memory.high (also bounded by ctx). Default 5 s.
	ReclaimWait time.Duration
	// Now and Sleep are the clock (tests inject them).
	Now   func() time.Time
	Sleep func(time.Duration)
	// Trace, if set, sees every file write just before it is made.
	Trace func(file, value string)
}

var _ Writer = (*Real)(nil)

// New returns a Real writer reading devices under p.Sys.
func New(p Paths) *Real {
	return &Real{paths: p, ReclaimWait: 5 * time.Second, Now: time.Now, Sleep: time.Sleep}
}

func (r *Real) trace(d Dir, file, value string) {
	if r.Trace != nil {
		r.Trace(filepath.Join(d.Path, file), value)
	}
}

// check makes sure the controller exists and the directory is there.
func check(ctx context.Context, d Dir, what string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if d.Version == cgroups.None || d.Path == "" {
		return fmt.Errorf("%w: %s", ErrUnavailable, what)
	}
	if _, err := os.Stat(d.Path); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("%w: %s", ErrVanished, d.Path)
		}
		return fmt.Errorf("cgroup: %w", err)
	}
	return nil
}

// v1Update applies res to the one v1 subsystem name of d via cgroup1.Load.
// The hierarchy is built from d.Mount: the library addresses a subsystem as
// <root>/<name>, so root is the mount's parent, which holds a directory (or
// the hybrid layout's symlink) named after the controller.
func v1Update(d Dir, name cgroup1.Name, res *specs.LinuxResources) error {
	rel, err := d.rel()
	if err != nil {
		return err
	}
	root := filepath.Dir(d.Mount)
	if filepath.Base(d.Mount) != string(name) {
		if real, err := filepath.EvalSymlinks(filepath.Join(root, string(name))); err != nil || real != d.Mount {
			return fmt.Errorf("%w: v1 %s mount %s has no %s/%s alias", ErrUnavailable, name, d.Mount, root, name)
		}
	}
	var sub cgroup1.Subsystem
	switch name {
	case cgroup1.Cpu:
		sub = cgroup1.NewCpu(root)
	case cgroup1.Cpuset:
		sub = cgroup1.NewCpuset(root)
	case cgroup1.Memory:
		sub = cgroup1.NewMemory(root)
	case cgroup1.Blkio:
		sub = cgroup1.NewBlkio(root)
	default:
		return fmt.Errorf("cgroup: unsupported v1 subsystem %s", name)
	}
	cg, err := cgroup1.Load(cgroup1.StaticPath(rel),
		cgroup1.WithHierarchy(func() ([]cgroup1.Subsystem, error) { return []cgroup1.Subsystem{sub}, nil }))
	if err != nil {
		if errors.Is(err, cgroup1.ErrCgroupDeleted) {
			return fmt.Errorf("%w: %s", ErrVanished, d.Path)
		}
		return fmt.Errorf("cgroup: load %s: %w", d.Path, err)
	}
	if err := cg.Update(res); err != nil {
		return fmt.Errorf("cgroup: update %s: %w", d.Path, err)
	}
	return nil
}

func v2Update(d Dir, res *cgroup2.Resources) error {
	rel, err := d.rel()
	if err != nil {
		return err
	}
	m, err := cgroup2.Load(rel, cgroup2.WithMountpoint(d.Mount))
	if err != nil {
		return fmt.Errorf("cgroup: load %s: %w", d.Path, err)
	}
	if err := m.Update(res); err != nil {
		return fmt.Errorf("cgroup: update %s: %w", d.Path, err)
	}
	return nil
}

// SetCPU sets the CPU quota (-1 = unlimited) and period, in the order the
// kernel accepts (see the package comment).
func (r *Real) SetCPU(ctx context.Context, t Target, quotaUs int64, periodUs uint64) error {
	if err := ValidateCPU(quotaUs, periodUs); err != nil {
		return err
	}
	d := t.CPU
	if err := check(ctx, d, "cpu"); err != nil {
		return err
	}
	if d.Version == cgroups.V2 {
		q := &quotaUs
		if quotaUs < 0 {
			q = nil
		}
		v := cgroup2.NewCPUMax(q, &periodUs)
		r.trace(d, "cpu.max", string(v))
		return v2Update(d, &cgroup2.Resources{CPU: &cgroup2.CPU{Max: v}})
	}
	oldQ, oldP, err := cgroups.ReadQuota(cgroups.Group{CPU: d.Path, CPUVersion: cgroups.V1})
	if err != nil {
		return err
	}
	writeQ := func() error {
		r.trace(d, "cpu.cfs_quota_us", strconv.FormatInt(quotaUs, 10))
		return v1Update(d, cgroup1.Cpu, &specs.LinuxResources{CPU: &specs.LinuxCPU{Quota: &quotaUs}})
	}
	writeP := func() error {
		r.trace(d, "cpu.cfs_period_us", strconv.FormatUint(periodUs, 10))
		return v1Update(d, cgroup1.Cpu, &specs.LinuxResources{CPU: &specs.LinuxCPU{Period: &periodUs}})
	}
	steps := cpuOrder(oldQ, oldP, quotaUs, periodUs, writeQ, writeP)
	for _, s := range steps {
		if err := s(); err != nil {
			return err
		}
	}
	return nil
}

// cpuOrder returns the v1 write steps for (oldQ,oldP) → (q,p). Writes that
// change nothing are skipped.
func cpuOrder(oldQ int64, oldP uint64, q int64, p uint64, writeQ, writeP func() error) []func() error {
	switch {
	case p == oldP && q == oldQ:
		return nil
	case p == oldP:
		return []func() error{writeQ}
	case q == oldQ: // only the period moves; one write, nothing to order
		return []func() error{writeP}
	case q == -1: // unlimit first, then the period cannot be rejected
		return []func() error{writeQ, writeP}
	case oldQ == -1: // period while unlimited, then the limit
		return []func() error{writeP, writeQ}
	case p < oldP: // quota first: newQ/oldP < newQ/newP
		return []func() error{writeQ, writeP}
	default: // period first: oldQ/newP < oldQ/oldP
		return []func() error{writeP, writeQ}
	}
}

// SetCPUWeight sets the CPU weight in v2 units (v1: converted to shares).
func (r *Real) SetCPUWeight(ctx context.Context, t Target, weight uint64) error {
	if err := ValidateWeight(weight); err != nil {
		return err
	}
	d := t.CPU
	if err := check(ctx, d, "cpu"); err != nil {
		return err
	}
	if d.Version == cgroups.V2 {
		r.trace(d, "cpu.weight", strconv.FormatUint(weight, 10))
		return v2Update(d, &cgroup2.Resources{CPU: &cgroup2.CPU{Weight: &weight}})
	}
	s := WeightToShares(weight)
	r.trace(d, "cpu.shares", strconv.FormatUint(s, 10))
	return v1Update(d, cgroup1.Cpu, &specs.LinuxResources{CPU: &specs.LinuxCPU{Shares: &s}})
}

// SetCpuset sets cpuset cpus and mems; an empty mems leaves mems unchanged.
// Both must lie within the parent's effective sets.
func (r *Real) SetCpuset(ctx context.Context, t Target, cpus, mems string) error {
	d := t.Cpuset
	if _, err := ParseList(cpus); err != nil {
		return err
	}
	if _, err := ParseList(mems); err != nil {
		return err
	}
	if err := check(ctx, d, "cpuset"); err != nil {
		return err
	}
	effC, effM := "cpuset.effective_cpus", "cpuset.effective_mems"
	if d.Version == cgroups.V2 {
		effC, effM = "cpuset.cpus.effective", "cpuset.mems.effective"
	}
	parent := filepath.Dir(d.Path)
	pc, err := readString(filepath.Join(parent, effC))
	if err != nil {
		return err
	}
	if err := validateSubset("cpus", cpus, pc); err != nil {
		return err
	}
	if mems != "" {
		pm, err := readString(filepath.Join(parent, effM))
		if err != nil {
			return err
		}
		if err := validateSubset("mems", mems, pm); err != nil {
			return err
		}
	}
	r.trace(d, "cpuset.cpus", cpus)
	if mems != "" {
		r.trace(d, "cpuset.mems", mems)
	}
	if d.Version == cgroups.V2 {
		return v2Update(d, &cgroup2.Resources{CPU: &cgroup2.CPU{Cpus: cpus, Mems: mems}})
	}
	return v1Update(d, cgroup1.Cpuset, &specs.LinuxResources{CPU: &specs.LinuxCPU{Cpus: cpus, Mems: mems}})
}

// SetMemory sets the hard and soft memory limits; see the package comment
// for the usage check and the v2 staging.
func (r *Real) SetMemory(ctx context.Context, t Target, m Memory) error {
	if err := ValidateMemory(m); err != nil {
		return err
	}
	d := t.Memory
	if err := check(ctx, d, "memory"); err != nil {
		return err
	}
	if d.Version == cgroups.V2 {
		return r.setMemoryV2(ctx, d, m)
	}
	usage, err := readInt(filepath.Join(d.Path, "memory.usage_in_bytes"))
	if err != nil {
		return err
	}
	if err := checkAboveUsage("memory.limit_in_bytes", m.Max, usage); err != nil {
		return err
	}
	r.trace(d, "memory.limit_in_bytes", strconv.FormatInt(m.Max, 10))
	r.trace(d, "memory.soft_limit_in_bytes", strconv.FormatInt(m.Soft, 10))
	// The library writes limit then soft limit in one Update.
	return v1Update(d, cgroup1.Memory, &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: &m.Max, Reservation: &m.Soft}})
}

func v2mem(v int64) int64 {
	if v < 0 {
		return math.MaxInt64 // the kernel clamps it to "max"
	}
	return v
}

func (r *Real) setMemoryV2(ctx context.Context, d Dir, m Memory) error {
	usage, err := readInt(filepath.Join(d.Path, "memory.current"))
	if err != nil {
		return err
	}
	if err := checkAboveUsage("memory.max", m.Max, usage); err != nil {
		return err
	}
	if err := checkAboveUsage("memory.high", m.Soft, usage); err != nil {
		return err
	}
	oldMax, err := readLimit(filepath.Join(d.Path, "memory.max"))
	if err != nil {
		return err
	}
	oldHigh, err := readLimit(filepath.Join(d.Path, "memory.high"))
	if err != nil {
		return err
	}
	set := func(file string, v int64) error {
		r.trace(d, file, strconv.FormatInt(v2mem(v), 10))
		vv := v2mem(v)
		mem := &cgroup2.Memory{}
		if file == "memory.max" {
			mem.Max = &vv
		} else {
			mem.High = &vv
		}
		return v2Update(d, &cgroup2.Resources{Memory: mem})
	}
	lowering := m.Max >= 0 && (oldMax < 0 || m.Max < oldMax)
	if !lowering {
		if err := set("memory.max", m.Max); err != nil {
			return err
		}
		return set("memory.high", m.Soft)
	}
	// Stage: throttle at the new limit first and let reclaim work.
	if err := set("memory.high", m.Max); err != nil {
		return err
	}
	deadline := r.Now().Add(r.ReclaimWait)
	if dl, ok := ctx.Deadline(); ok && dl.Before(deadline) {
		deadline = dl
	}
	for {
		cur, err := readInt(filepath.Join(d.Path, "memory.current"))
		if err != nil {
			return err
		}
		if cur <= m.Max {
			break
		}
		if !r.Now().Before(deadline) || ctx.Err() != nil {
			restore := set("memory.high", oldHigh)
			return errors.Join(fmt.Errorf("%w: memory.current %d > %d after %v; memory.max left at %d",
				ErrReclaimTimeout, cur, m.Max, r.ReclaimWait, oldMax), restore)
		}
		r.Sleep(20 * time.Millisecond)
	}
	if err := set("memory.max", m.Max); err != nil {
		return err
	}
	return set("memory.high", m.Soft)
}

// SetBlockIO sets the per-device throttles of dev ("MAJ:MIN"); 0 removes a
// limit.
func (r *Real) SetBlockIO(ctx context.Context, t Target, dev string, l IOLimit) error {
	maj, mnr, err := validateDevice(r.paths.Sys, dev)
	if err != nil {
		return err
	}
	d := t.BlkIO
	if err := check(ctx, d, "blkio/io"); err != nil {
		return err
	}
	if d.Version == cgroups.V2 {
		rate := func(v uint64) uint64 {
			if v == 0 {
				return math.MaxUint64 // U64_MAX is "max" to the kernel; 0 is ERANGE
			}
			return v
		}
		io := &cgroup2.IO{Max: []cgroup2.Entry{
			{Type: cgroup2.ReadBPS, Major: maj, Minor: mnr, Rate: rate(l.RBps)},
			{Type: cgroup2.WriteBPS, Major: maj, Minor: mnr, Rate: rate(l.WBps)},
			{Type: cgroup2.ReadIOPS, Major: maj, Minor: mnr, Rate: rate(l.RIOPS)},
			{Type: cgroup2.WriteIOPS, Major: maj, Minor: mnr, Rate: rate(l.WIOPS)},
		}}
		for _, e := range io.Max {
			r.trace(d, "io.max", e.String())
		}
		return v2Update(d, &cgroup2.Resources{IO: io})
	}
	td := func(v uint64) []specs.LinuxThrottleDevice {
		x := specs.LinuxThrottleDevice{Rate: v}
		x.Major, x.Minor = maj, mnr
		return []specs.LinuxThrottleDevice{x}
	}
	for _, f := range []struct {
		file string
		v    uint64
	}{{"read_bps_device", l.RBps}, {"write_bps_device", l.WBps}, {"read_iops_device", l.RIOPS}, {"write_iops_device", l.WIOPS}} {
		r.trace(d, "blkio.throttle."+f.file, fmt.Sprintf("%s %d", dev, f.v))
	}
	return v1Update(d, cgroup1.Blkio, &specs.LinuxResources{BlockIO: &specs.LinuxBlockIO{
		ThrottleReadBpsDevice:   td(l.RBps),
		ThrottleWriteBpsDevice:  td(l.WBps),
		ThrottleReadIOPSDevice:  td(l.RIOPS),
		ThrottleWriteIOPSDevice: td(l.WIOPS),
	}})
}

// Read returns the configured values of every available controller.
func (r *Real) Read(ctx context.Context, t Target) (State, error) {
	var s State
	if err := ctx.Err(); err != nil {
		return s, err
	}
	if d := t.CPU; d.Version != cgroups.None {
		if err := check(ctx, d, "cpu"); err != nil {
			return s, err
		}
		q, p, err := cgroups.ReadQuota(cgroups.Group{CPU: d.Path, CPUVersion: d.Version})
		if err != nil {
			return s, err
		}
		s.QuotaUs, s.PeriodUs = q, p
		if d.Version == cgroups.V1 {
			v, err := readInt(filepath.Join(d.Path, "cpu.shares"))
			if err != nil {
				return s, err
			}
			s.Shares, s.Weight = uint64(v), SharesToWeight(uint64(v))
		} else {
			v, err := readInt(filepath.Join(d.Path, "cpu.weight"))
			if err != nil {
				return s, err
			}
			s.Weight = uint64(v)
		}
	}
	if d := t.Cpuset; d.Version != cgroups.None {
		var err error
		if s.Cpus, err = readString(filepath.Join(d.Path, "cpuset.cpus")); err != nil {
			return s, err
		}
		if s.Mems, err = readString(filepath.Join(d.Path, "cpuset.mems")); err != nil {
			return s, err
		}
	}
	if d := t.Memory; d.Version != cgroups.None {
		files := [3]string{"memory.limit_in_bytes", "memory.soft_limit_in_bytes", "memory.usage_in_bytes"}
		if d.Version == cgroups.V2 {
			files = [3]string{"memory.max", "memory.high", "memory.current"}
		}
		var err error
		if s.MemMax, err = readLimit(filepath.Join(d.Path, files[0])); err != nil {
			return s, err
		}
		if s.MemSoft, err = readLimit(filepath.Join(d.Path, files[1])); err != nil {
			return s, err
		}
		if s.MemUsage, err = readInt(filepath.Join(d.Path, files[2])); err != nil {
			return s, err
		}
	}
	if d := t.BlkIO; d.Version != cgroups.None {
		var err error
		if d.Version == cgroups.V2 {
			s.IO, err = readIOMax(filepath.Join(d.Path, "io.max"))
		} else {
			s.IO, err = readThrottleV1(d.Path)
		}
		if err != nil {
			return s, err
		}
	}
	return s, nil
}

func readString(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return "", fmt.Errorf("%w: %s", ErrVanished, path)
		}
		return "", fmt.Errorf("cgroup: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}

func readInt(path string) (int64, error) {
	s, err := readString(path)
	if err != nil {
		return 0, err
	}
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("cgroup: parse %s: %w", path, err)
	}
	return v, nil
}

// readLimit reads a memory limit: "max", -1 or a value ≥ 2^62 (v1's
// PAGE_COUNTER_MAX in bytes) mean unlimited (-1).
func readLimit(path string) (int64, error) {
	s, err := readString(path)
	if err != nil {
		return 0, err
	}
	if s == "max" {
		return -1, nil
	}
	v, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		if s == "-1" {
			return -1, nil
		}
		return 0, fmt.Errorf("cgroup: parse %s: %w", path, err)
	}
	if v >= 1<<62 {
		return -1, nil
	}
	return int64(v), nil
}

// ParseIOMax parses v2 io.max text ("8:0 rbps=1 wbps=max riops=max wiops=max").
func ParseIOMax(text string) (map[string]IOLimit, error) {
	out := map[string]IOLimit{}
	for _, line := range strings.Split(text, "\n") {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		if _, _, err := ParseDevice(f[0]); err != nil {
			return nil, fmt.Errorf("cgroup: io.max line %q: %w", line, err)
		}
		l := out[f[0]]
		for _, kv := range f[1:] {
			k, v, ok := strings.Cut(kv, "=")
			if !ok {
				return nil, fmt.Errorf("cgroup: io.max line %q: bad %q", line, kv)
			}
			var n uint64
			if v != "max" {
				var err error
				if n, err = strconv.ParseUint(v, 10, 64); err != nil {
					return nil, fmt.Errorf("cgroup: io.max line %q: bad %q", line, kv)
				}
				if n == math.MaxUint64 {
					n = 0
				}
			}
			l.set(k, n)
		}
		out[f[0]] = l
	}
	return out, nil
}

func readIOMax(path string) (map[string]IOLimit, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("cgroup: %w", err)
	}
	return ParseIOMax(string(b))
}

// set stores n in the field an io.max key names (rbps, wbps, riops,
// wiops); other keys are ignored.
func (l *IOLimit) set(key string, n uint64) {
	switch key {
	case "rbps":
		l.RBps = n
	case "wbps":
		l.WBps = n
	case "riops":
		l.RIOPS = n
	case "wiops":
		l.WIOPS = n
	}
}

// v1Throttle maps the v1 blkio.throttle.* files to the io.max keys.
var v1Throttle = [...]struct{ file, key string }{
	{"read_bps_device", "rbps"}, {"write_bps_device", "wbps"},
	{"read_iops_device", "riops"}, {"write_iops_device", "wiops"},
}

func readThrottleV1(dir string) (map[string]IOLimit, error) {
	out := map[string]IOLimit{}
	for _, t := range v1Throttle {
		f := t.file
		b, err := os.ReadFile(filepath.Join(dir, "blkio.throttle."+f))
		if err != nil {
			return nil, fmt.Errorf("cgroup: %w", err)
		}
		for _, line := range strings.Split(string(b), "\n") {
			x := strings.Fields(line)
			if len(x) != 2 {
				continue
			}
			n, err := strconv.ParseUint(x[1], 10, 64)
			if err != nil {
				return nil, fmt.Errorf("cgroup: blkio.throttle.%s line %q: %w", f, line, err)
			}
			l := out[x[0]]
			l.set(t.key, n)
			out[x[0]] = l
		}
	}
	return out, nil
}
