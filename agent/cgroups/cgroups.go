// Package cgroups owns ARS's view of the host's cgroup hierarchies: where
// each controller is mounted (v1, v2 or hybrid), which cgroup a process is
// in, reading CPU usage and throttling, and the low-level file writes the
// executor uses. It never decides what to write; the executor does.
package cgroups

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Paths are the host roots this package reads. Tests point them elsewhere.
type Paths struct {
	Proc string // usually /proc
}

// DefaultPaths are the real host roots.
func DefaultPaths() Paths { return Paths{Proc: "/proc"} }

// Host describes the cgroup mounts of this host.
type Host struct {
	paths Paths
	// V1 maps a v1 controller name (cpu, cpuacct, memory, ...) to its mount point.
	V1 map[string]string
	// Unified is the cgroup2 mount point, "" if none.
	Unified string
	// UnifiedControllers are the controllers enabled at the cgroup2 root.
	UnifiedControllers map[string]bool
}

// Detect reads /proc/self/mountinfo to find the hierarchies.
func Detect(p Paths) (*Host, error) {
	f, err := os.Open(filepath.Join(p.Proc, "self", "mountinfo"))
	if err != nil {
		return nil, fmt.Errorf("cgroups: read mountinfo: %w", err)
	}
	defer f.Close()
	h := &Host{paths: p, V1: map[string]string{}, UnifiedControllers: map[string]bool{}}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		// 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
		fields := strings.Fields(sc.Text())
		sep := -1
		for i, f := range fields {
			if f == "-" {
				sep = i
				break
			}
		}
		if sep < 0 || sep+3 >= len(fields)+1 || len(fields) < 5 {
			continue
		}
		mnt := unescapeMount(fields[4])
		fstype := fields[sep+1]
		switch fstype {
		case "cgroup2":
			if h.Unified == "" {
				h.Unified = mnt
			}
		case "cgroup":
			if sep+3 >= len(fields) {
				continue
			}
			for _, opt := range strings.Split(fields[sep+3], ",") {
				switch opt {
				case "rw", "ro", "relatime", "noatime", "nosuid", "nodev", "noexec",
					// cgroup v1 mount options that are not controllers
					"xattr", "noprefix", "clone_children", "cpuset_v2_mode", "favordynmods":
					continue
				}
				if strings.HasPrefix(opt, "name=") || strings.Contains(opt, "=") {
					continue
				}
				if _, dup := h.V1[opt]; !dup {
					h.V1[opt] = mnt
				}
			}
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("cgroups: scan mountinfo: %w", err)
	}
	if h.Unified != "" {
		b, err := os.ReadFile(filepath.Join(h.Unified, "cgroup.controllers"))
		if err == nil {
			for _, c := range strings.Fields(string(b)) {
				h.UnifiedControllers[c] = true
			}
		}
	}
	if len(h.V1) == 0 && h.Unified == "" {
		return nil, errors.New("cgroups: no cgroup filesystem mounted")
	}
	return h, nil
}

func unescapeMount(s string) string {
	// mountinfo escapes space, tab, newline and backslash as \ooo.
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// Version says which cgroup version serves a controller on this host.
type Version int

const (
	// None means the controller is not available.
	None Version = iota
	// V1 is a legacy per-controller hierarchy.
	V1
	// V2 is the unified hierarchy.
	V2
)

func (v Version) String() string {
	switch v {
	case V1:
		return "v1"
	case V2:
		return "v2"
	}
	return "none"
}

// VersionOf tells which hierarchy serves controller. v1 wins when both list
// it (a controller can be bound to one hierarchy only, so that cannot occur
// on a correct host).
func (h *Host) VersionOf(controller string) Version {
	if _, ok := h.V1[controller]; ok {
		return V1
	}
	if h.UnifiedControllers[controller] {
		return V2
	}
	return None
}

// Membership maps a controller (or "" for the unified hierarchy) to the
// cgroup path relative to that hierarchy's root, as /proc/PID/cgroup says.
type Membership map[string]string

// MembershipOf parses /proc/<pid>/cgroup. pid 0 means self.
func (h *Host) MembershipOf(pid int) (Membership, error) {
	who := "self"
	if pid > 0 {
		who = strconv.Itoa(pid)
	}
	b, err := os.ReadFile(filepath.Join(h.paths.Proc, who, "cgroup"))
	if err != nil {
		return nil, fmt.Errorf("cgroups: membership of %s: %w", who, err)
	}
	return ParseMembership(string(b))
}

// ParseMembership parses the text of /proc/PID/cgroup.
func ParseMembership(text string) (Membership, error) {
	m := Membership{}
	for _, line := range strings.Split(text, "\n") {
		if line == "" {
			continue
		}
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			return nil, fmt.Errorf("cgroups: malformed /proc/PID/cgroup line %q", line)
		}
		if parts[1] == "" {
			m[""] = parts[2]
			continue
		}
		for _, c := range strings.Split(parts[1], ",") {
			m[c] = parts[2]
		}
	}
	return m, nil
}

// Dir returns the absolute directory of controller for a membership.
func (h *Host) Dir(m Membership, controller string) (string, error) {
	switch h.VersionOf(controller) {
	case V1:
		rel, ok := m[controller]
		if !ok {
			return "", fmt.Errorf("cgroups: process is in no %s cgroup", controller)
		}
		return filepath.Join(h.V1[controller], rel), nil
	case V2:
		rel, ok := m[""]
		if !ok {
			return "", fmt.Errorf("cgroups: process is in no cgroup2 cgroup")
		}
		return filepath.Join(h.Unified, rel), nil
	}
	return "", fmt.Errorf("cgroups: controller %s not available on this host", controller)
}

// Group is one logical cgroup (a VM's) across the controllers ARS uses.
type Group struct {
	// CPU is the directory holding the CPU quota files (v1 cpu or v2).
	CPU string
	// CPUAcct is the directory holding usage accounting (v1 cpuacct or v2).
	CPUAcct string
	// CPUVersion is the version serving the cpu controller.
	CPUVersion Version
}

// GroupOf returns the cgroup directories of pid.
func (h *Host) GroupOf(pid int) (Group, error) {
	m, err := h.MembershipOf(pid)
	if err != nil {
		return Group{}, err
	}
	return h.groupFrom(m)
}

func (h *Host) groupFrom(m Membership) (Group, error) {
	var g Group
	var err error
	g.CPUVersion = h.VersionOf("cpu")
	if g.CPU, err = h.Dir(m, "cpu"); err != nil {
		return g, err
	}
	acct := "cpuacct"
	if h.VersionOf(acct) == None {
		acct = "cpu"
	}
	if g.CPUAcct, err = h.Dir(m, acct); err != nil {
		return g, err
	}
	return g, nil
}

// CPUStat is the CPU accounting of one cgroup.
type CPUStat struct {
	UsageNs       uint64 // total CPU time of the cgroup
	Periods       uint64 // enforcement periods elapsed
	Throttled     uint64 // periods in which the cgroup was throttled
	ThrottledNs   uint64 // total throttled time
	QuotaUs       int64  // -1 when unlimited
	PeriodUs      uint64 // enforcement period
	QuotaReadable bool
}

// ReadCPU reads usage, throttling and the current quota of g.
func ReadCPU(g Group) (CPUStat, error) {
	var s CPUStat
	switch g.CPUVersion {
	case V1:
		u, err := readUint(filepath.Join(g.CPUAcct, "cpuacct.usage"))
		if err != nil {
			return s, err
		}
		s.UsageNs = u
		kv, err := readKV(filepath.Join(g.CPU, "cpu.stat"))
		if err != nil {
			return s, err
		}
		s.Periods, s.Throttled, s.ThrottledNs = kv["nr_periods"], kv["nr_throttled"], kv["throttled_time"]
		q, p, err := ReadQuota(g)
		if err != nil {
			return s, err
		}
		s.QuotaUs, s.PeriodUs, s.QuotaReadable = q, p, true
	case V2:
		kv, err := readKV(filepath.Join(g.CPU, "cpu.stat"))
		if err != nil {
			return s, err
		}
		s.UsageNs = kv["usage_usec"] * 1000
		s.Periods, s.Throttled, s.ThrottledNs = kv["nr_periods"], kv["nr_throttled"], kv["throttled_usec"]*1000
		q, p, err := ReadQuota(g)
		if err != nil {
			return s, err
		}
		s.QuotaUs, s.PeriodUs, s.QuotaReadable = q, p, true
	default:
		return s, errors.New("cgroups: no cpu controller")
	}
	return s, nil
}

// ReadQuota returns the CPU quota (-1 = unlimited) and period in µs.
func ReadQuota(g Group) (quotaUs int64, periodUs uint64, err error) {
	switch g.CPUVersion {
	case V1:
		q, err := readInt(filepath.Join(g.CPU, "cpu.cfs_quota_us"))
		if err != nil {
			return 0, 0, err
		}
		p, err := readUint(filepath.Join(g.CPU, "cpu.cfs_period_us"))
		if err != nil {
			return 0, 0, err
		}
		return q, p, nil
	case V2:
		b, err := os.ReadFile(filepath.Join(g.CPU, "cpu.max"))
		if err != nil {
			return 0, 0, fmt.Errorf("cgroups: %w", err)
		}
		return ParseCPUMax(string(b))
	}
	return 0, 0, errors.New("cgroups: no cpu controller")
}

// ParseCPUMax parses the v2 "cpu.max" text: "max 100000" or "50000 100000".
func ParseCPUMax(text string) (quotaUs int64, periodUs uint64, err error) {
	f := strings.Fields(text)
	if len(f) != 2 {
		return 0, 0, fmt.Errorf("cgroups: malformed cpu.max %q", text)
	}
	if f[0] == "max" {
		quotaUs = -1
	} else if quotaUs, err = strconv.ParseInt(f[0], 10, 64); err != nil || quotaUs <= 0 {
		return 0, 0, fmt.Errorf("cgroups: malformed cpu.max quota %q", f[0])
	}
	if periodUs, err = strconv.ParseUint(f[1], 10, 64); err != nil || periodUs == 0 {
		return 0, 0, fmt.Errorf("cgroups: malformed cpu.max period %q", f[1])
	}
	return quotaUs, periodUs, nil
}

// WriteQuota sets the CPU quota of g (quotaUs -1 = unlimited) keeping its
// period. It is the only cgroup write in the package and is called only by
// the executor.
func WriteQuota(g Group, quotaUs int64) error {
	switch g.CPUVersion {
	case V1:
		return WriteFile(filepath.Join(g.CPU, "cpu.cfs_quota_us"), strconv.FormatInt(quotaUs, 10))
	case V2:
		_, period, err := ReadQuota(g)
		if err != nil {
			return err
		}
		v := "max"
		if quotaUs >= 0 {
			v = strconv.FormatInt(quotaUs, 10)
		}
		return WriteFile(filepath.Join(g.CPU, "cpu.max"), fmt.Sprintf("%s %d", v, period))
	}
	return errors.New("cgroups: no cpu controller")
}

// WriteFile writes one cgroup control file, with the path in the error.
func WriteFile(path, value string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		return fmt.Errorf("cgroups: open %s: %w", path, err)
	}
	if _, err := f.WriteString(value); err != nil {
		f.Close()
		return fmt.Errorf("cgroups: write %q to %s: %w", value, path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("cgroups: close %s: %w", path, err)
	}
	return nil
}

func readUint(path string) (uint64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, fmt.Errorf("cgroups: %w", err)
	}
	v, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("cgroups: parse %s: %w", path, err)
	}
	return v, nil
}

func readInt(path string) (int64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, fmt.Errorf("cgroups: %w", err)
	}
	v, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("cgroups: parse %s: %w", path, err)
	}
	return v, nil
}

func readKV(path string) (map[string]uint64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("cgroups: %w", err)
	}
	m := map[string]uint64{}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) != 2 {
			continue
		}
		v, err := strconv.ParseUint(f[1], 10, 64)
		if err != nil {
			return nil, fmt.Errorf("cgroups: parse %s line %q: %w", path, line, err)
		}
		m[f[0]] = v
	}
	return m, nil
}
