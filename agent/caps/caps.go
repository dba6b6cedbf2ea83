// Package caps owns what arsd may do given the Linux capabilities it
// runs with: it reads the effective set of the process (CapEff in
// /proc/self/status) and maps each of arsd's features to the
// capabilities it needs, so that arsd says at start exactly which
// feature is off and why instead of failing later on EPERM.
package caps

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Cap is a capability number (linux/capability.h).
type Cap uint

// The capabilities arsd's features use.
const (
	DACOverride Cap = 1
	NetAdmin    Cap = 12
	IPCLock     Cap = 14
	SysPtrace   Cap = 19
	SysAdmin    Cap = 21
	SysResource Cap = 24
	PerfMon     Cap = 38
	BPF         Cap = 39
)

var capNames = map[Cap]string{
	0: "CAP_CHOWN", DACOverride: "CAP_DAC_OVERRIDE", 2: "CAP_DAC_READ_SEARCH", 3: "CAP_FOWNER",
	4: "CAP_FSETID", 5: "CAP_KILL", 6: "CAP_SETGID", 7: "CAP_SETUID", 8: "CAP_SETPCAP",
	9: "CAP_LINUX_IMMUTABLE", 10: "CAP_NET_BIND_SERVICE", 11: "CAP_NET_BROADCAST", NetAdmin: "CAP_NET_ADMIN",
	13: "CAP_NET_RAW", IPCLock: "CAP_IPC_LOCK", 15: "CAP_IPC_OWNER", 16: "CAP_SYS_MODULE", 17: "CAP_SYS_RAWIO",
	18: "CAP_SYS_CHROOT", SysPtrace: "CAP_SYS_PTRACE", 20: "CAP_SYS_PACCT", SysAdmin: "CAP_SYS_ADMIN",
	22: "CAP_SYS_BOOT", 23: "CAP_SYS_NICE", SysResource: "CAP_SYS_RESOURCE", 25: "CAP_SYS_TIME",
	26: "CAP_SYS_TTY_CONFIG", 27: "CAP_MKNOD", 28: "CAP_LEASE", 29: "CAP_AUDIT_WRITE", 30: "CAP_AUDIT_CONTROL",
	31: "CAP_SETFCAP", 32: "CAP_MAC_OVERRIDE", 33: "CAP_MAC_ADMIN", 34: "CAP_SYSLOG", 35: "CAP_WAKE_ALARM",
	36: "CAP_BLOCK_SUSPEND", 37: "CAP_AUDIT_READ", PerfMon: "CAP_PERFMON", BPF: "CAP_BPF",
	40: "CAP_CHECKPOINT_RESTORE",
}

func (c Cap) String() string {
	if n, ok := capNames[c]; ok {
		return n
	}
	return fmt.Sprintf("cap_%d", uint(c))
}

// Set is a capability bit set.
type Set uint64

// Has reports whether c is in the set.
func (s Set) Has(c Cap) bool { return c < 64 && s&(1<<c) != 0 }

// Without returns the set without cs.
func (s Set) Without(cs ...Cap) Set {
	for _, c := range cs {
		s &^= 1 << c
	}
	return s
}

func (s Set) String() string {
	var names []string
	for c := Cap(0); c < 64; c++ {
		if s.Has(c) {
			names = append(names, c.String())
		}
	}
	return strings.Join(names, ",")
}

// Process is what Read finds about the running process.
type Process struct {
	Effective Set
	// EUID is the effective uid: root owns the cgroup and QMP files, so a
	// root process writes them without CAP_DAC_OVERRIDE.
	EUID int
}

// Read reads the effective capability set of the process from
// <proc>/self/status (proc is "/proc" on a host; tests pass a tree).
func Read(proc string) (Process, error) {
	path := filepath.Join(proc, "self", "status")
	b, err := os.ReadFile(path)
	if err != nil {
		return Process{}, fmt.Errorf("capabilities: %w", err)
	}
	p := Process{EUID: -1}
	found := false
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		v = strings.TrimSpace(v)
		switch k {
		case "CapEff":
			n, err := strconv.ParseUint(v, 16, 64)
			if err != nil {
				return Process{}, fmt.Errorf("capabilities: %s: CapEff %q: %w", path, v, err)
			}
			p.Effective, found = Set(n), true
		case "Uid":
			if f := strings.Fields(v); len(f) >= 2 {
				if n, err := strconv.Atoi(f[1]); err == nil {
					p.EUID = n
				}
			}
		}
	}
	if !found {
		return Process{}, fmt.Errorf("capabilities: no CapEff line in %s", path)
	}
	return p, nil
}

// Feature is one thing arsd does that needs privileges.
type Feature string

// arsd's privileged features.
const (
	EBPF         Feature = "eBPF telemetry"
	ProgramStats Feature = "BPF program run-time statistics"
	NetShaping   Feature = "network shaping (tc)"
	CgroupWrites Feature = "cgroup CPU/memory limits"
	QMPForeign   Feature = "QMP sockets owned by other users"
)

// Status says whether a feature is on and, when off, why.
type Status struct {
	Feature Feature
	On      bool
	// Needs names what the feature needs, e.g. "CAP_NET_ADMIN".
	Needs string
	// Why explains an off feature; empty when on.
	Why string
}

func (s Status) String() string {
	if s.On {
		return fmt.Sprintf("%s: on", s.Feature)
	}
	return fmt.Sprintf("%s: off (%s)", s.Feature, s.Why)
}

// Report is every feature's status.
type Report []Status

// Check maps p's capabilities to arsd's features.
func Check(p Process) Report {
	e := p.Effective
	missing := func(cs ...Cap) string {
		var m []string
		for _, c := range cs {
			if !e.Has(c) {
				m = append(m, c.String())
			}
		}
		return strings.Join(m, " and ")
	}
	var r Report
	// eBPF: CAP_BPF to load, CAP_PERFMON for tracing programs and to read
	// kernel memory; CAP_SYS_ADMIN covers both (kernels before 5.8 know
	// only it).
	if e.Has(SysAdmin) || (e.Has(BPF) && e.Has(PerfMon)) {
		r = append(r, Status{Feature: EBPF, On: true, Needs: "CAP_BPF+CAP_PERFMON or CAP_SYS_ADMIN"})
	} else {
		r = append(r, Status{Feature: EBPF, Needs: "CAP_BPF+CAP_PERFMON or CAP_SYS_ADMIN",
			Why: "no " + missing(BPF, PerfMon) + " (nor CAP_SYS_ADMIN): probes are not loaded; run-queue delay comes from schedstat"})
	}
	// BPF_ENABLE_STATS needs CAP_SYS_ADMIN whatever else is held.
	if e.Has(SysAdmin) {
		r = append(r, Status{Feature: ProgramStats, On: true, Needs: "CAP_SYS_ADMIN"})
	} else {
		r = append(r, Status{Feature: ProgramStats, Needs: "CAP_SYS_ADMIN",
			Why: "no CAP_SYS_ADMIN: BPF_ENABLE_STATS refused; per-program run time is not exported"})
	}
	if e.Has(NetAdmin) {
		r = append(r, Status{Feature: NetShaping, On: true, Needs: "CAP_NET_ADMIN"})
	} else {
		r = append(r, Status{Feature: NetShaping, Needs: "CAP_NET_ADMIN",
			Why: "no CAP_NET_ADMIN: tc qdiscs cannot be changed; network SLAs are not enforced"})
	}
	// cgroup files and QMP sockets belong to root: a root process writes
	// them as their owner; anyone else needs CAP_DAC_OVERRIDE.
	if p.EUID == 0 || e.Has(DACOverride) {
		r = append(r, Status{Feature: CgroupWrites, On: true, Needs: "euid 0 or CAP_DAC_OVERRIDE"})
	} else {
		r = append(r, Status{Feature: CgroupWrites, Needs: "euid 0 or CAP_DAC_OVERRIDE",
			Why: fmt.Sprintf("euid %d without CAP_DAC_OVERRIDE: cgroup limits cannot be written; CPU allocation is observed only", p.EUID)})
	}
	if e.Has(DACOverride) {
		r = append(r, Status{Feature: QMPForeign, On: true, Needs: "CAP_DAC_OVERRIDE"})
	} else {
		r = append(r, Status{Feature: QMPForeign, Needs: "CAP_DAC_OVERRIDE",
			Why: "no CAP_DAC_OVERRIDE: only QMP sockets arsd's user may write are used (QEMU run as another user with a 0600 socket is not controlled)"})
	}
	return r
}

// On reports whether f is on in the report.
func (r Report) On(f Feature) bool {
	for _, s := range r {
		if s.Feature == f {
			return s.On
		}
	}
	return false
}

// Off lists the features that are off.
func (r Report) Off() []Status {
	var out []Status
	for _, s := range r {
		if !s.On {
			out = append(out, s)
		}
	}
	return out
}

// Summary is a one-line account of the off features for status output:
// "all privileged features on" or "network shaping (tc) off: no
// CAP_NET_ADMIN; ...".
func (r Report) Summary() string {
	off := r.Off()
	if len(off) == 0 {
		return "all privileged features on"
	}
	parts := make([]string, len(off))
	for i, s := range off {
		why, _, _ := strings.Cut(s.Why, ":")
		parts[i] = fmt.Sprintf("%s off: %s", s.Feature, why)
	}
	return strings.Join(parts, "; ")
}
