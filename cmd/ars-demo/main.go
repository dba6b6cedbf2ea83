// Command ars-demo is what `make demo` runs: it boots two small TCG VMs
// with their QMP sockets in arsd's default directory, starts arsd on its
// embedded defaults, drives one guest idle → busy → idle, prints a live
// table of what arsd sees and does, and ends with a summary. Everything it
// started (QEMU processes, cgroups, sockets, arsd) is removed on exit,
// including on Ctrl-C.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/ars-dev/ars/agent/cgroups"
	"github.com/ars-dev/ars/agent/config"
	"github.com/ars-dev/ars/agent/status"
	"github.com/ars-dev/ars/agent/telemetry"
	"github.com/ars-dev/ars/internal/vm"
	"github.com/ars-dev/ars/ipc"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "ars-demo:", err)
		os.Exit(1)
	}
}

func say(format string, a ...any) {
	fmt.Printf("==> "+format+"\n", a...)
}

type phase struct {
	name string
	cpu  int // guest load, % of one CPU
	dur  time.Duration
}

// phaseStats summarizes what arsd reported for the driven VM in a phase.
type phaseStats struct {
	samples                    int
	minAlloc, maxAlloc         int64
	sumUsage, maxUsage, maxP99 float64
	firstRaise                 time.Duration
}

func run() error {
	var (
		arsdBin  = flag.String("arsd", "bin/arsd", "arsd binary")
		guestDir = flag.String("guest", "build/guest", "directory with vmlinuz and initramfs.gz")
		idle     = flag.Duration("idle", 25*time.Second, "length of each idle phase")
		busy     = flag.Duration("busy", 45*time.Second, "length of the busy phase")
		accel    = flag.String("accel", "tcg", "QEMU accelerator: tcg, or kvm where /dev/kvm works (the Vagrant box)")
	)
	flag.Parse()
	if os.Geteuid() != 0 {
		return errors.New("needs root: it creates cgroups, boots QEMU and loads eBPF")
	}
	defaults := config.Default()
	qmpDir := defaults.QMPDir
	if err := os.MkdirAll(qmpDir, 0o750); err != nil {
		return err
	}
	// arsd on its defaults manages every socket in the QMP directory; never
	// run the demo next to VMs we did not start.
	if others, _ := filepath.Glob(filepath.Join(qmpDir, "*.sock")); len(others) > 0 {
		return fmt.Errorf("%s already holds QMP sockets (%s): the demo's arsd would manage those VMs too; "+
			"stop them or run the demo on another host", qmpDir, strings.Join(others, ", "))
	}
	gd, err := filepath.Abs(*guestDir)
	if err != nil {
		return err
	}
	*guestDir = gd
	for _, f := range []string{"vmlinuz", "initramfs.gz"} {
		if _, err := os.Stat(filepath.Join(*guestDir, f)); err != nil {
			return fmt.Errorf("guest not built (%v): run make guest", err)
		}
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	work, err := os.MkdirTemp("", "ars-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	host, err := cgroups.Detect(cgroups.DefaultPaths())
	if err != nil {
		return err
	}

	// Boot both VMs at once; each prints when ready.
	names := []string{"demo-busy", "demo-idle"}
	vms := make([]*vm.VM, len(names))
	defer func() {
		for _, v := range vms {
			if v != nil {
				if err := v.Close(); err != nil {
					fmt.Fprintln(os.Stderr, "ars-demo: cleanup:", err)
				}
			}
		}
		say("cleaned up: VMs stopped, their cgroups and sockets removed")
	}()
	say("booting %d TCG VMs (1 vCPU, 192 MiB each); this takes about 20-40 s", len(names))
	var wg sync.WaitGroup
	errs := make([]error, len(names))
	start := time.Now()
	for i, n := range names {
		wg.Add(1)
		go func() {
			defer wg.Done()
			dir := filepath.Join(work, n)
			if err := os.Mkdir(dir, 0o700); err != nil {
				errs[i] = err
				return
			}
			v, err := vm.Start(ctx, host, vm.Config{Accel: *accel,
				Name: n, Dir: dir, VCPUs: 1, MemMiB: 192,
				Kernel: filepath.Join(*guestDir, "vmlinuz"), Initrd: filepath.Join(*guestDir, "initramfs.gz"),
				QMPSocket: filepath.Join(qmpDir, n+".sock"),
			})
			if err != nil {
				errs[i] = err
				return
			}
			vms[i] = v
			say("%s: QEMU pid %d started in cgroup %s", n, v.PID, v.Cgroup.Dirs["cpu"])
			rctx, cancel := context.WithTimeout(ctx, 120*time.Second)
			defer cancel()
			if err := v.WaitReady(rctx); err != nil {
				errs[i] = err
				return
			}
			say("%s: guest ready after %.1fs", n, time.Since(start).Seconds())
		}()
	}
	tickerDone := make(chan struct{})
	go func() {
		t := time.NewTicker(5 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-tickerDone:
				return
			case <-t.C:
				say("still booting (%.0fs)...", time.Since(start).Seconds())
			}
		}
	}()
	wg.Wait()
	close(tickerDone)
	if err := errors.Join(errs...); err != nil {
		return err
	}

	// arsd on its embedded defaults: no flags at all.
	say("starting %s on its embedded defaults (QMP dir %s, metrics %s, control %s)",
		*arsdBin, qmpDir, defaults.MetricsAddr, defaults.ControlSocket)
	logPath := filepath.Join(work, "arsd.log")
	logf, err := os.Create(logPath)
	if err != nil {
		return err
	}
	defer logf.Close()
	// arsd on its defaults pins its eBPF maps under /sys/fs/bpf/ars and
	// keeps its lease under /run/ars; what the demo's arsd created there
	// is removed when it has stopped, like everything else it started.
	_, pinErr := os.Stat(defaultPinDir)
	runBefore := dirEntries(runDir)
	defer func() {
		if os.IsNotExist(pinErr) {
			if err := telemetry.Unpin(defaultPinDir); err != nil {
				fmt.Fprintln(os.Stderr, "ars-demo: cleanup:", err)
			}
		}
		for name := range dirEntries(runDir) {
			if !runBefore[name] && strings.HasPrefix(name, "lease") {
				os.Remove(filepath.Join(runDir, name))
			}
		}
	}()
	arsd := exec.Command(*arsdBin)
	arsd.Stdout, arsd.Stderr = logf, logf
	if err := arsd.Start(); err != nil {
		return fmt.Errorf("start arsd: %w", err)
	}
	arsdDone := make(chan error, 1)
	go func() { arsdDone <- arsd.Wait() }()
	defer func() {
		arsd.Process.Signal(syscall.SIGTERM)
		select {
		case <-arsdDone:
		case <-time.After(10 * time.Second):
			arsd.Process.Kill()
			<-arsdDone
		}
		say("arsd stopped; its log was %s (removed with the work dir)", logPath)
	}()

	phases := []phase{{"idle", 0, *idle}, {"busy", 100, *busy}, {"idle again", 0, *idle + 10*time.Second}}
	stats := make([]phaseStats, len(phases))
	busyVM := vms[0]
	var lastAlloc int64 = -1 // the busy VM's allocation before the current phase
	for pi, ph := range phases {
		say("phase %q: %s runs at %d%% CPU for %s", ph.name, busyVM.Name, ph.cpu, ph.dur)
		if err := busyVM.SetLoad(ctx, vm.Load{CPUPercent: ph.cpu}); err != nil {
			return fmt.Errorf("set load: %w", err)
		}
		st := &stats[pi]
		st.minAlloc = 1 << 62
		phaseStart := time.Now()
		startAlloc := lastAlloc
		for time.Since(phaseStart) < ph.dur {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case err := <-arsdDone:
				arsdDone <- err
				log, _ := os.ReadFile(logPath)
				return fmt.Errorf("arsd exited (%v):\n%s", err, log)
			case <-time.After(2 * time.Second):
			}
			cctx, cancel := context.WithTimeout(ctx, 3*time.Second)
			var vmsNow []status.VM
			err := ipc.Call(cctx, defaults.ControlSocket, "vms", nil, &vmsNow)
			cancel()
			if err != nil {
				say("waiting for arsd: %v", err)
				continue
			}
			fmt.Printf("\n--- %s, t+%2.0fs ---\n", ph.name, time.Since(phaseStart).Seconds())
			status.WriteTable(os.Stdout, vmsNow)
			for _, v := range vmsNow {
				if v.Name != busyVM.Name {
					continue
				}
				st.samples++
				st.sumUsage += v.UsageMillicores
				st.maxUsage = max(st.maxUsage, v.UsageMillicores)
				st.maxP99 = max(st.maxP99, v.RunqP99Ns)
				st.minAlloc = min(st.minAlloc, v.AllocMillicores)
				st.maxAlloc = max(st.maxAlloc, v.AllocMillicores)
				if startAlloc >= 0 && st.firstRaise == 0 && v.AllocMillicores > startAlloc {
					st.firstRaise = time.Since(phaseStart)
				}
				lastAlloc = v.AllocMillicores
			}
		}
	}

	var snap status.Snapshot
	if err := ipc.Call(ctx, defaults.ControlSocket, "status", nil, &snap); err != nil {
		return err
	}
	fmt.Println()
	say("summary for %s (CPU in cores)", busyVM.Name)
	for i, ph := range phases {
		st := stats[i]
		if st.samples == 0 {
			fmt.Printf("  %-11s no samples\n", ph.name)
			continue
		}
		raise := ""
		if st.firstRaise > 0 {
			raise = fmt.Sprintf(", first raise after %.0fs", st.firstRaise.Seconds())
		}
		fmt.Printf("  %-11s mean usage %.2f, max usage %.2f, allocation %.2f..%.2f, max vCPU run-queue p99 %.2f ms%s\n",
			ph.name, st.sumUsage/float64(st.samples)/1000, st.maxUsage/1000,
			float64(st.minAlloc)/1000, float64(st.maxAlloc)/1000, st.maxP99/1e6, raise)
	}
	var n uint64
	for k, v := range snap.Actions {
		fmt.Printf("  executor %s: %d\n", k, v)
		n += v
	}
	fmt.Printf("  telemetry: %s; DRM generation %d; audit log: %s\n",
		snap.Telemetry, snap.Generation, filepath.Join(defaults.StateDir, "audit.log"))
	if stats[1].maxAlloc <= stats[0].maxAlloc {
		return errors.New("arsd did not raise the busy VM's allocation: see the table above")
	}
	if stats[2].minAlloc >= stats[1].maxAlloc {
		return errors.New("arsd did not lower the VM's allocation after the load dropped: see the table above")
	}
	return nil
}

// Where arsd's defaults put pinned eBPF objects and its lease.
const (
	defaultPinDir = "/sys/fs/bpf/ars"
	runDir        = "/run/ars"
)

// dirEntries lists the names in dir (empty if it cannot be read).
func dirEntries(dir string) map[string]bool {
	out := map[string]bool{}
	es, _ := os.ReadDir(dir)
	for _, e := range es {
		out[e.Name()] = true
	}
	return out
}
