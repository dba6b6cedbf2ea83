// Package discovery owns finding the QEMU VMs running on this host from a
// directory of QMP sockets (default /run/ars/qmp/*.sock; a VM's name is its
// socket's file name without ".sock") and learning, for each, what the rest
// of the agent needs: the QEMU PID (from SO_PEERCRED, checked to be a QEMU
// process), its vCPU threads (query-cpus-fast, each checked to be a thread
// of that PID), its cgroup and its command line.
//
// Connections stay open. QEMU serves one client per QMP socket, and the agent
// keeps one monitor per VM for later actuation (balloon, vCPU hotplug,
// throttling), so discovery hands the monitor over instead of closing it:
//
//   - Scan is one pass: every VM it returns carries an open *qmp.Monitor
//     that the caller owns and must Close (CloseAll does that for a slice).
//   - Watcher is the long-lived owner the agent uses: it keeps the monitors,
//     and each Refresh reports VMs added (new socket), removed (socket gone
//     or replaced, or QEMU closed the connection) and updated (vCPU set
//     changed). It never redials a VM it holds.
//
// One bad socket (stale file, QEMU gone, another client holding it, a
// symlink, not QEMU on the other end) never hides the others: it becomes a
// *SocketError naming the socket.
package discovery

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"

	"github.com/ars-dev/ars/agent/cgroups"
	"github.com/ars-dev/ars/agent/qmp"
)

// DefaultDir is where QMP sockets are looked for by default.
const DefaultDir = "/run/ars/qmp"

// SocketSuffix marks QMP sockets in the directory.
const SocketSuffix = ".sock"

// Paths are the host roots this package reads. Tests point them elsewhere.
type Paths struct {
	Proc string // usually /proc
}

// DefaultPaths are the real host roots.
func DefaultPaths() Paths { return Paths{Proc: "/proc"} }

// Options tune discovery. The zero value is usable.
type Options struct {
	// Paths default to DefaultPaths.
	Paths Paths
	// QMP configures each connection; its Timeout bounds dial, handshake
	// and every query per socket. ExpectPID is ignored (the PID is learnt).
	QMP qmp.Options
	// Parallel is how many sockets are probed at once (default 4), so one
	// hung socket costs one timeout, not one per socket behind it.
	Parallel int
}

func (o Options) withDefaults() Options {
	if o.Paths.Proc == "" {
		o.Paths = DefaultPaths()
	}
	if o.Parallel <= 0 {
		o.Parallel = 4
	}
	o.QMP.ExpectPID = 0
	return o
}

// VCPU is one virtual CPU and the host thread that runs it.
type VCPU struct {
	Index   int    // cpu-index
	TID     int    // host thread id, a thread of VM.PID
	QOMPath string // e.g. /machine/unattached/device[0]
}

// VM is one running QEMU found through its QMP socket.
type VM struct {
	Name    string // socket file name without .sock
	Socket  string // socket path
	PID     int    // QEMU process (SO_PEERCRED)
	UID     int    // its user (SO_PEERCRED)
	VCPUs   []VCPU // sorted by Index
	Cgroup  cgroups.Group
	Cmdline []string
	Exe     string // /proc/PID/exe target, "" if unreadable
	// Monitor is the open QMP connection. Whoever got the VM from Scan owns
	// it and must Close it; VMs from a Watcher share the Watcher's.
	Monitor *qmp.Monitor
}

// SocketError is a socket that did not yield a VM.
type SocketError struct {
	Name   string // VM name the socket would have had
	Socket string
	Err    error
}

func (e *SocketError) Error() string {
	return fmt.Sprintf("discovery: %s (%s): %v", e.Name, e.Socket, e.Err)
}

func (e *SocketError) Unwrap() error { return e.Err }

// ErrNotQEMU is wrapped when the process serving a socket is not QEMU.
var ErrNotQEMU = errors.New("socket peer is not a QEMU process")

// socketEntry is one candidate socket in the directory.
type socketEntry struct {
	name, path string
	dev, ino   uint64
}

// listSockets returns the *.sock entries of dir sorted by name. Anything
// with the suffix is returned, sockets or not, so a misplaced file or a
// symlink is reported by Probe rather than silently skipped.
func listSockets(dir string) ([]socketEntry, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("discovery: list %s: %w", dir, err)
	}
	var out []socketEntry
	for _, e := range ents {
		n := e.Name()
		if !strings.HasSuffix(n, SocketSuffix) || len(n) == len(SocketSuffix) {
			continue
		}
		se := socketEntry{name: strings.TrimSuffix(n, SocketSuffix), path: filepath.Join(dir, n)}
		se.dev, se.ino = identity(se.path)
		out = append(out, se)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out, nil
}

// identity returns the device and inode of path itself (not a link target).
func identity(path string) (dev, ino uint64) {
	fi, err := os.Lstat(path)
	if err != nil {
		return 0, 0
	}
	return statIDs(fi)
}

// Scan probes every *.sock in dir (in parallel, bounded by
// Options.Parallel) and returns the VMs found, sorted by name, each with an
// open Monitor the caller owns, and one error per socket that failed (a
// *SocketError), or a single error if dir cannot be read. host may be nil:
// cgroups are then not looked up.
func Scan(ctx context.Context, dir string, host *cgroups.Host, opts Options) ([]VM, []error) {
	opts = opts.withDefaults()
	socks, err := listSockets(dir)
	if err != nil {
		return nil, []error{err}
	}
	return probeAll(ctx, socks, host, opts)
}

func probeAll(ctx context.Context, socks []socketEntry, host *cgroups.Host, opts Options) ([]VM, []error) {
	type result struct {
		vm  VM
		err error
	}
	res := make([]result, len(socks))
	sem := make(chan struct{}, opts.Parallel)
	var wg sync.WaitGroup
	for i, s := range socks {
		wg.Add(1)
		go func() {
			defer wg.Done()
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				res[i].err = &SocketError{Name: s.name, Socket: s.path, Err: ctx.Err()}
				return
			}
			defer func() { <-sem }()
			res[i].vm, res[i].err = Probe(ctx, s.name, s.path, host, opts)
		}()
	}
	wg.Wait()
	var vms []VM
	var errs []error
	for _, r := range res { // socks are sorted by name, so both are
		if r.err != nil {
			errs = append(errs, r.err)
			continue
		}
		vms = append(vms, r.vm)
	}
	return vms, errs
}

// Probe connects to one socket and describes the VM behind it. On success
// the VM's Monitor is open and owned by the caller; on failure nothing is
// left open and the error is a *SocketError.
func Probe(ctx context.Context, name, socket string, host *cgroups.Host, opts Options) (VM, error) {
	opts = opts.withDefaults()
	fail := func(err error) (VM, error) {
		return VM{}, &SocketError{Name: name, Socket: socket, Err: err}
	}
	m, err := qmp.Dial(ctx, socket, opts.QMP)
	if err != nil {
		return fail(err)
	}
	vm, err := describe(ctx, m, host, opts.Paths)
	if err != nil {
		m.Close()
		return fail(err)
	}
	vm.Name, vm.Socket = name, socket
	return vm, nil
}

// describe fills a VM from its monitor and /proc. The /proc reads come
// before the last QMP query and the vCPU threads are checked against
// /proc/PID/task after it, so a PID reused after QEMU exited cannot pass:
// QEMU was alive (answering) after we read its files.
func describe(ctx context.Context, m *qmp.Monitor, host *cgroups.Host, p Paths) (VM, error) {
	pid := m.PeerPID()
	vm := VM{PID: pid, UID: m.PeerUID(), Monitor: m}
	procDir := procDirOf(p, pid)

	comm, err := os.ReadFile(filepath.Join(procDir, "comm"))
	if err != nil {
		return vm, fmt.Errorf("peer pid %d: %w", pid, err)
	}
	vm.Exe, _ = os.Readlink(filepath.Join(procDir, "exe")) // needs ptrace rights; optional
	if err := checkQEMU(pid, strings.TrimSpace(string(comm)), vm.Exe); err != nil {
		return vm, err
	}
	cmdline, err := os.ReadFile(filepath.Join(procDir, "cmdline"))
	if err != nil {
		return vm, fmt.Errorf("peer pid %d: %w", pid, err)
	}
	vm.Cmdline = splitCmdline(cmdline)
	if host != nil {
		if vm.Cgroup, err = host.GroupOf(pid); err != nil {
			return vm, fmt.Errorf("cgroup of pid %d: %w", pid, err)
		}
	}
	if vm.VCPUs, err = vcpus(ctx, m, procDir); err != nil {
		return vm, err
	}
	return vm, nil
}

// checkQEMU accepts a process whose comm or executable name starts with
// "qemu" (comm can be renamed with -name process=..., exe can be unreadable).
func checkQEMU(pid int, comm, exe string) error {
	if strings.HasPrefix(comm, "qemu") || strings.HasPrefix(filepath.Base(exe), "qemu") {
		return nil
	}
	if exe == "" {
		exe = "unreadable"
	}
	return fmt.Errorf("%w: pid %d has comm %q, exe %s", ErrNotQEMU, pid, comm, exe)
}

func splitCmdline(b []byte) []string {
	s := strings.TrimRight(string(b), "\x00")
	if s == "" {
		return nil
	}
	return strings.Split(s, "\x00")
}

// vcpus runs query-cpus-fast and checks every thread belongs to the process.
func vcpus(ctx context.Context, m *qmp.Monitor, procDir string) ([]VCPU, error) {
	cpus, err := m.QueryCPUsFast(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]VCPU, 0, len(cpus))
	for _, c := range cpus {
		if c.ThreadID <= 0 {
			return nil, fmt.Errorf("vCPU %d has no thread id", c.CPUIndex)
		}
		if _, err := os.Stat(filepath.Join(procDir, "task", strconv.Itoa(c.ThreadID))); err != nil {
			return nil, fmt.Errorf("vCPU %d thread %d is not a thread of pid %d: %w", c.CPUIndex, c.ThreadID, m.PeerPID(), err)
		}
		out = append(out, VCPU{Index: c.CPUIndex, TID: c.ThreadID, QOMPath: c.QOMPath})
	}
	slices.SortFunc(out, func(a, b VCPU) int { return a.Index - b.Index })
	return out, nil
}

// CloseAll closes the monitors of vms.
func CloseAll(vms []VM) {
	for _, vm := range vms {
		if vm.Monitor != nil {
			vm.Monitor.Close()
		}
	}
}

func procDirOf(p Paths, pid int) string { return filepath.Join(p.Proc, strconv.Itoa(pid)) }
