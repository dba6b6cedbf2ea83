// Package vm owns booting and tearing down ARS's test guests: a TCG QEMU
// running guest/build.sh's kernel and initramfs, started inside a fresh
// cgroup beneath the caller's own, optionally with a raw disk image and a
// tap in a private network namespace, and controlled through a
// virtio-serial line protocol spoken by guest/workload. Tests use it through
// internal/vmtest; demo programs may use it directly. Close removes
// everything Start made, even after a half-finished Start.
package vm

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/ars-dev/ars/agent/cgroups"
)

// ReadyLine is what the guest's /init prints on the serial console once the
// workload serves commands.
const ReadyLine = "ARS-GUEST-READY"

// Guest network addresses (link-local, inside the VM's own netns only).
const (
	HostAddr  = "169.254.100.1"
	GuestAddr = "169.254.100.2"
	PrefixLen = 24
)

// Config describes one test guest. Zero values take the documented defaults.
type Config struct {
	// Name names the VM (QEMU -name, cgroup, netns); [A-Za-z0-9][A-Za-z0-9_.-]{0,39}.
	Name string
	// Dir is the work directory for sockets, logs and the disk image.
	// Required; it must be private to this VM.
	Dir string
	// Kernel and Initrd default to <repo>/build/guest/{vmlinuz,initramfs.gz}
	// (see GuestDir).
	Kernel, Initrd string
	// VCPUs defaults to 1; MaxVCPUs (hotplug slots) to max(VCPUs, 4).
	VCPUs, MaxVCPUs int
	// MemMiB defaults to 192.
	MemMiB int
	// QMPSocket defaults to Dir/qmp.sock.
	QMPSocket string
	// Disk attaches a sparse raw image Dir/disk.raw (DiskMiB, default 64) as
	// virtio-blk /dev/vda, with cache=none,aio=native when Dir supports
	// O_DIRECT (else cache=writeback,aio=threads; see VM.DiskCache).
	Disk    bool
	DiskMiB int
	// Net creates netns ars-<name>-<rand> holding tap ars-<short> with
	// 169.254.100.1/24, and runs QEMU inside it with a virtio-net NIC on the
	// tap. The guest configures 169.254.100.2/24 on eth0.
	Net bool
	// CgroupControllers default to cpu, cpuacct, memory.
	CgroupControllers []string
	// NoBalloon leaves out the virtio-balloon device (id balloon0), which is
	// present by default.
	NoBalloon bool
	// Accel is QEMU's accelerator: "tcg" (also when empty) or "kvm" (with
	// -cpu host). Not picked automatically: on the CI machines /dev/kvm
	// opens but QEMU aborts setting MSRs, so KVM is opted into (ars-demo
	// --accel kvm, e.g. in the Vagrant box).
	Accel string
	// KernelArgs are appended to the kernel command line, e.g.
	// "ars.schedule=5s:cpu=100;5s:cpu=0" or "ars.set=cpu=50".
	KernelArgs []string
	// ExtraArgs are appended to QEMU's command line (e.g. -incoming).
	ExtraArgs []string
	// QEMU is the emulator binary; default qemu-system-x86_64 from PATH.
	QEMU string
}

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$`)

// maxSockPath is the usable length of sockaddr_un.sun_path.
const maxSockPath = 107

func (c Config) withDefaults() (Config, error) {
	if !nameRE.MatchString(c.Name) {
		return c, fmt.Errorf("vm: bad name %q: want [A-Za-z0-9][A-Za-z0-9_.-]{0,39}", c.Name)
	}
	if c.Dir == "" {
		return c, errors.New("vm: Config.Dir is required")
	}
	dir, err := filepath.Abs(c.Dir)
	if err != nil {
		return c, fmt.Errorf("vm: work dir: %w", err)
	}
	c.Dir = dir
	if c.Kernel == "" || c.Initrd == "" {
		gd, err := GuestDir()
		if err != nil {
			return c, err
		}
		if c.Kernel == "" {
			c.Kernel = filepath.Join(gd, "vmlinuz")
		}
		if c.Initrd == "" {
			c.Initrd = filepath.Join(gd, "initramfs.gz")
		}
	}
	for _, f := range []string{c.Kernel, c.Initrd} {
		if _, err := os.Stat(f); err != nil {
			return c, fmt.Errorf("vm: guest image %s missing (run make guest): %w", f, err)
		}
	}
	if c.VCPUs == 0 {
		c.VCPUs = 1
	}
	if c.MaxVCPUs == 0 {
		c.MaxVCPUs = max(c.VCPUs, 4)
	}
	if c.Accel != "" && c.Accel != "tcg" && c.Accel != "kvm" {
		return c, fmt.Errorf("vm: Accel %q: want tcg, kvm or empty (auto)", c.Accel)
	}
	if c.VCPUs < 1 || c.MaxVCPUs < c.VCPUs {
		return c, fmt.Errorf("vm: bad vCPU counts %d/%d", c.VCPUs, c.MaxVCPUs)
	}
	if c.MemMiB == 0 {
		c.MemMiB = 192
	}
	if c.MemMiB < 64 {
		return c, fmt.Errorf("vm: MemMiB %d too small for the guest (min 64)", c.MemMiB)
	}
	if c.DiskMiB == 0 {
		c.DiskMiB = 64
	}
	if c.QMPSocket == "" {
		c.QMPSocket = filepath.Join(c.Dir, "qmp.sock")
	}
	for _, s := range []string{c.QMPSocket, filepath.Join(c.Dir, ctlSocket)} {
		if len(s) > maxSockPath {
			return c, fmt.Errorf("vm: socket path %s longer than %d bytes; use a shorter Dir", s, maxSockPath)
		}
	}
	if len(c.CgroupControllers) == 0 {
		c.CgroupControllers = []string{"cpu", "cpuacct", "memory"}
	}
	if c.QEMU == "" {
		c.QEMU = "qemu-system-x86_64"
	}
	return c, nil
}

const ctlSocket = "ctl.sock"

// VM is a running guest. Close it.
type VM struct {
	Name string
	// PID is QEMU's process id (a direct child of this process).
	PID int
	// QMPPath is QEMU's QMP socket. QMP serves one client at a time.
	QMPPath string
	// CtlPath is the host end of the guest's ars.ctl virtio-serial port.
	CtlPath string
	// Cgroup is the cgroup QEMU runs in, beneath the caller's own.
	Cgroup *cgroups.Owned
	// NetNS and Tap are set with Config.Net.
	NetNS, Tap string
	// SerialLog is the guest's serial console, written by QEMU.
	SerialLog string
	// QEMULog holds QEMU's own stdout and stderr.
	QEMULog string
	// DiskPath and DiskCache are set with Config.Disk.
	DiskPath, DiskCache string
	// Args is QEMU's full command line (after the cgroup/netns wrapper).
	Args []string

	cfg     Config
	started time.Time
	ip      string // path of ip(8), with Net

	cmd     *exec.Cmd
	exited  chan struct{}
	exitErr error

	readyMu sync.Mutex
	readyIn time.Duration

	ctlMu  sync.Mutex
	ctl    net.Conn
	ctlR   *bufio.Reader
	ctlSeq uint64

	closeOnce sync.Once
	closeErr  error
}

// Start boots a guest and returns once QEMU is up (its QMP socket exists);
// call WaitReady to wait for the guest itself. host may be nil (detected).
// ctx bounds the start only; the VM runs until Close. On error everything
// made so far has been removed.
func Start(ctx context.Context, host *cgroups.Host, cfg Config) (_ *VM, err error) {
	cfg, err = cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	if host == nil {
		if host, err = cgroups.Detect(cgroups.DefaultPaths()); err != nil {
			return nil, fmt.Errorf("vm: %w", err)
		}
	}
	qemu, err := exec.LookPath(cfg.QEMU)
	if err != nil {
		return nil, fmt.Errorf("vm: QEMU binary: %w", err)
	}
	if err := os.MkdirAll(cfg.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("vm: work dir: %w", err)
	}
	v := &VM{
		Name:      cfg.Name,
		QMPPath:   cfg.QMPSocket,
		CtlPath:   filepath.Join(cfg.Dir, ctlSocket),
		SerialLog: filepath.Join(cfg.Dir, "serial.log"),
		QEMULog:   filepath.Join(cfg.Dir, "qemu.log"),
		cfg:       cfg,
		exited:    make(chan struct{}),
	}
	defer func() {
		if err != nil {
			if cerr := v.Close(); cerr != nil {
				err = errors.Join(err, fmt.Errorf("vm: cleanup after failed start: %w", cerr))
			}
		}
	}()
	suffix, err := randHex(3)
	if err != nil {
		return nil, err
	}

	// Stale sockets of an earlier run in the same Dir would make QEMU fail.
	for _, s := range []string{v.QMPPath, v.CtlPath} {
		if err := os.Remove(s); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("vm: remove stale socket: %w", err)
		}
	}
	for _, f := range []string{v.SerialLog, v.QEMULog} {
		if err := os.WriteFile(f, nil, 0o644); err != nil {
			return nil, fmt.Errorf("vm: %w", err)
		}
	}

	v.Cgroup, err = host.CreateUnderSelf("ars-"+cfg.Name+"-"+suffix, cfg.CgroupControllers...)
	if err != nil {
		return nil, fmt.Errorf("vm: %w", err)
	}

	if cfg.Disk {
		v.DiskPath = filepath.Join(cfg.Dir, "disk.raw")
		if v.DiskCache, err = makeDisk(v.DiskPath, cfg.DiskMiB); err != nil {
			return nil, err
		}
	}

	var netArgs []string
	if cfg.Net {
		if v.ip, err = exec.LookPath("ip"); err != nil {
			return nil, fmt.Errorf("vm: Net needs ip(8) from iproute2: %w", err)
		}
		if err := v.setupNet(ctx, suffix); err != nil {
			return nil, err
		}
		netArgs = []string{v.ip, "netns", "exec", v.NetNS}
	}

	v.Args = append([]string{qemu}, qemuArgs(cfg, v)...)
	// QEMU must be inside its cgroup from its first instruction, so that
	// every thread and every page it ever uses is accounted there. cgroup v1
	// has no CLONE_INTO_CGROUP, and moving QEMU after start would leave its
	// early CPU time and memory in our cgroup. So a tiny shell writes its own
	// pid into each cgroup.procs and then execs (ip netns exec and) QEMU: the
	// pid, and the cgroup membership, carry over to QEMU. Paths are passed as
	// arguments, never spliced into the script.
	dirs := make([]string, 0, len(v.Cgroup.Dirs))
	for _, d := range v.Cgroup.Dirs {
		dirs = append(dirs, d)
	}
	const wrapper = `n=$1; shift
while [ "$n" -gt 0 ]; do echo $$ > "$1/cgroup.procs" || exit 125; shift; n=$((n-1)); done
exec "$@"`
	argv := append([]string{"-c", wrapper, "ars-vm-wrapper", strconv.Itoa(len(dirs))}, dirs...)
	argv = append(argv, netArgs...)
	argv = append(argv, v.Args...)
	logf, err := os.OpenFile(v.QEMULog, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return nil, fmt.Errorf("vm: %w", err)
	}
	defer logf.Close()
	v.cmd = exec.Command("/bin/sh", argv...)
	v.cmd.Stdout, v.cmd.Stderr = logf, logf
	v.cmd.Dir = cfg.Dir
	v.cmd.SysProcAttr = &syscall.SysProcAttr{
		// Own process group: a terminal's Ctrl-C reaches only the caller,
		// which then closes the VM in order.
		Setpgid: true,
		// If the caller dies without Close (a crashed or killed test
		// binary), the kernel kills QEMU. It survives the execs above
		// (neither ip nor qemu is setuid).
		Pdeathsig: syscall.SIGKILL,
	}
	v.started = time.Now()
	if err := v.cmd.Start(); err != nil {
		v.cmd = nil
		return nil, fmt.Errorf("vm: start QEMU: %w", err)
	}
	v.PID = v.cmd.Process.Pid
	go func() {
		v.exitErr = v.cmd.Wait()
		close(v.exited)
	}()

	if err := v.waitSocket(ctx, v.QMPPath, 20*time.Second); err != nil {
		return nil, err
	}
	return v, nil
}

func (v *VM) waitSocket(ctx context.Context, path string, limit time.Duration) error {
	deadline := time.NewTimer(limit)
	defer deadline.Stop()
	tick := time.NewTicker(25 * time.Millisecond)
	defer tick.Stop()
	for {
		if fi, err := os.Stat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
			return nil
		}
		select {
		case <-v.exited:
			return fmt.Errorf("vm %s: QEMU exited during start (%v); qemu.log:\n%s", v.Name, v.exitErr, tail(v.QEMULog, 20))
		case <-ctx.Done():
			return fmt.Errorf("vm %s: waiting for %s: %w", v.Name, path, ctx.Err())
		case <-deadline.C:
			return fmt.Errorf("vm %s: no QMP socket %s after %s; qemu.log:\n%s", v.Name, path, limit, tail(v.QEMULog, 20))
		case <-tick.C:
		}
	}
}

// accel resolves Config.Accel.
func accel(a string) string {
	if a == "" {
		return "tcg"
	}
	return a
}

// qemuArgs builds QEMU's arguments (without the binary).
func qemuArgs(cfg Config, v *VM) []string {
	appendArgs := append([]string{"console=ttyS0", "quiet", "panic=1"}, cfg.KernelArgs...)
	a := []string{
		"-name", "guest=" + cfg.Name + ",debug-threads=on", // vCPU threads named "CPU N/TCG", as under libvirt
		"-machine", "q35,accel=" + accel(cfg.Accel),
		"-cpu", map[string]string{"kvm": "host", "tcg": "qemu64"}[accel(cfg.Accel)],
		"-smp", fmt.Sprintf("%d,maxcpus=%d", cfg.VCPUs, cfg.MaxVCPUs),
		"-m", strconv.Itoa(cfg.MemMiB),
		"-nodefaults", "-no-user-config",
		"-display", "none",
		"-no-reboot",
		"-serial", "file:" + v.SerialLog,
		"-qmp", "unix:" + v.QMPPath + ",server=on,wait=off",
		"-kernel", cfg.Kernel,
		"-initrd", cfg.Initrd,
		"-append", strings.Join(appendArgs, " "),
		"-chardev", "socket,id=arsctl,path=" + v.CtlPath + ",server=on,wait=off",
		"-device", "virtio-serial-pci,id=vser0",
		"-device", "virtserialport,bus=vser0.0,chardev=arsctl,name=ars.ctl",
	}
	if !cfg.NoBalloon {
		a = append(a, "-device", "virtio-balloon-pci,id=balloon0")
	}
	if cfg.Disk {
		aio := "native"
		if v.DiskCache != "none" {
			aio = "threads"
		}
		a = append(a,
			"-drive", fmt.Sprintf("file=%s,format=raw,if=none,id=disk0,cache=%s,aio=%s", v.DiskPath, v.DiskCache, aio),
			"-device", "virtio-blk-pci,drive=disk0,id=vda")
	}
	if cfg.Net {
		a = append(a,
			"-netdev", "tap,id=net0,ifname="+v.Tap+",script=no,downscript=no",
			"-device", "virtio-net-pci,netdev=net0,id=nic0,mac="+macFor(cfg.Name))
	}
	return append(a, cfg.ExtraArgs...)
}

// macFor derives a stable locally administered MAC from the VM name.
func macFor(name string) string {
	h := uint32(2166136261)
	for i := 0; i < len(name); i++ {
		h ^= uint32(name[i])
		h *= 16777619
	}
	return fmt.Sprintf("52:54:00:%02x:%02x:%02x", byte(h>>16), byte(h>>8), byte(h))
}

// makeDisk creates a sparse raw image and picks the cache mode: cache=none
// (O_DIRECT on the host, so guest writes reach the host block layer at the
// rate the guest issues them) when the filesystem supports O_DIRECT.
func makeDisk(path string, mib int) (cache string, err error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return "", fmt.Errorf("vm: disk image: %w", err)
	}
	err = f.Truncate(int64(mib) << 20)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return "", fmt.Errorf("vm: disk image: %w", err)
	}
	d, err := os.OpenFile(path, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		return "writeback", nil // e.g. tmpfs
	}
	d.Close()
	return "none", nil
}

// WaitReady waits until the guest prints ReadyLine. On timeout or QEMU exit
// the error carries the tail of the serial log.
func (v *VM) WaitReady(ctx context.Context) error {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		if v.serialHasReady() {
			v.readyMu.Lock()
			if v.readyIn == 0 {
				v.readyIn = time.Since(v.started)
			}
			v.readyMu.Unlock()
			return nil
		}
		select {
		case <-v.exited:
			return fmt.Errorf("vm %s: QEMU exited before the guest was ready (%v); qemu.log:\n%s\nserial log tail:\n%s",
				v.Name, v.exitErr, tail(v.QEMULog, 10), tail(v.SerialLog, 30))
		case <-ctx.Done():
			return fmt.Errorf("vm %s: guest not ready after %s (%w); serial log tail:\n%s",
				v.Name, time.Since(v.started).Round(time.Millisecond), ctx.Err(), tail(v.SerialLog, 30))
		case <-tick.C:
		}
	}
}

// BootTime is the time from QEMU's start to the ready line, once WaitReady
// has seen it (0 before).
func (v *VM) BootTime() time.Duration {
	v.readyMu.Lock()
	defer v.readyMu.Unlock()
	return v.readyIn
}

func (v *VM) serialHasReady() bool {
	b, err := os.ReadFile(v.SerialLog)
	if err != nil {
		return false
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.TrimRight(l, "\r") == ReadyLine {
			return true
		}
	}
	return false
}

// Exited is closed when QEMU has exited.
func (v *VM) Exited() <-chan struct{} { return v.exited }

// Close stops QEMU (SIGTERM, then SIGKILL after 5 s) and removes the
// cgroup, tap, netns, sockets and disk image. Logs stay in Dir. It is safe
// to call more than once and on a VM whose Start failed half way; later
// calls return the first call's result.
func (v *VM) Close() error {
	v.closeOnce.Do(func() { v.closeErr = v.close() })
	return v.closeErr
}

func (v *VM) close() error {
	var errs []error
	v.ctlMu.Lock()
	if v.ctl != nil {
		v.ctl.Close()
		v.ctl, v.ctlR = nil, nil
	}
	v.ctlMu.Unlock()

	if v.cmd != nil {
		if err := v.stopQEMU(); err != nil {
			errs = append(errs, err)
		}
	}
	if v.NetNS != "" {
		if err := v.teardownNet(); err != nil {
			errs = append(errs, err)
		}
	}
	if v.Cgroup != nil {
		if err := v.Cgroup.Remove(); err != nil {
			errs = append(errs, fmt.Errorf("vm %s: %w", v.Name, err))
		}
	}
	for _, f := range []string{v.QMPPath, v.CtlPath, v.DiskPath} {
		if f == "" {
			continue
		}
		if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("vm %s: %w", v.Name, err))
		}
	}
	return errors.Join(errs...)
}

// stopQEMU signals only our own child, by PID, and only while it has not
// been reaped (so the PID cannot have been reused).
func (v *VM) stopQEMU() error {
	for _, step := range []struct {
		sig  syscall.Signal
		wait time.Duration
	}{{syscall.SIGTERM, 5 * time.Second}, {syscall.SIGKILL, 5 * time.Second}} {
		select {
		case <-v.exited:
			return nil
		default:
		}
		if err := v.cmd.Process.Signal(step.sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
			return fmt.Errorf("vm %s: signal QEMU pid %d: %w", v.Name, v.PID, err)
		}
		select {
		case <-v.exited:
			return nil
		case <-time.After(step.wait):
		}
	}
	return fmt.Errorf("vm %s: QEMU pid %d did not exit after SIGKILL", v.Name, v.PID)
}

func randHex(n int) (string, error) {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("vm: random: %w", err)
	}
	return hex.EncodeToString(b), nil
}

// tail returns the last n lines of a file, for error messages.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	s := strings.Join(lines, "\n")
	if strings.TrimSpace(s) == "" {
		return "(empty)"
	}
	return s
}
