//go:build linux

package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/ars-dev/ars/agent/telemetry"
)

func main() {
	dur := flag.Duration("duration", 5*time.Second, "measurement window per load")
	workers := flag.Int("switch", 2, "stress-ng --switch workers (context-switch storm)")
	flag.Parse()
	if err := run(os.Stdout, *dur, *workers); err != nil {
		fmt.Fprintf(os.Stderr, "bench-bpf: %+v\n", err)
		os.Exit(1)
	}
}

// prog is one attached program under measurement.
type prog struct {
	group string // "ars", "ref" or "floor"
	name  string // attach point
	p     *ebpf.Program
}

type delta struct {
	runs uint64
	ns   uint64
}

func (d delta) perRun() float64 {
	if d.runs == 0 {
		return 0
	}
	return float64(d.ns) / float64(d.runs)
}

func snapshot(progs []prog) ([]delta, error) {
	out := make([]delta, len(progs))
	for i, p := range progs {
		s, err := p.p.Stats()
		if err != nil {
			return nil, fmt.Errorf("%s/%s stats: %w", p.group, p.name, err)
		}
		out[i] = delta{runs: s.RunCount, ns: uint64(s.Runtime.Nanoseconds())}
	}
	return out, nil
}

// ars is every ARS telemetry probe that loads here.
type ars struct {
	rq  *telemetry.Runqlat
	flt *telemetry.Faults
	bio *telemetry.BlockIO
}

func (a *ars) track(pids []int, tids []uint32) error {
	for _, tid := range tids {
		if err := a.rq.Track(tid, 1, 0); err != nil {
			return err
		}
	}
	for _, pid := range pids {
		if err := a.flt.TrackProcess(uint32(pid), 1); err != nil {
			return err
		}
		if err := a.bio.TrackProcess(uint32(pid), 1); err != nil {
			return err
		}
	}
	return nil
}

func run(w io.Writer, dur time.Duration, workers int) error {
	stressng, err := exec.LookPath("stress-ng")
	if err != nil {
		return fmt.Errorf("stress-ng is needed for the context-switch storm (apt-get install stress-ng): %w", err)
	}
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		return fmt.Errorf("enable BPF run-time stats: %w", err)
	}
	defer stats.Close()

	// Reference and floor.
	spec, err := loadRef()
	if err != nil {
		return err
	}
	var ref refPrograms
	if err := spec.LoadAndAssign(&ref, nil); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return fmt.Errorf("load reference: %+v", ve)
		}
		return fmt.Errorf("load reference: %w", err)
	}
	defer ref.Close()
	progs := []prog{
		{"ref", "sched_switch", ref.RefSchedSwitch},
		{"ref", "sched_wakeup", ref.RefSchedWakeup},
		{"ref", "sched_wakeup_new", ref.RefSchedWakeupNew},
		{"floor", "sched_switch", ref.EmptySchedSwitch},
	}
	for _, p := range progs {
		l, err := link.AttachTracing(link.TracingOptions{Program: p.p, AttachType: ebpf.AttachTraceRawTp})
		if err != nil {
			return fmt.Errorf("attach %s/%s: %w", p.group, p.name, err)
		}
		defer l.Close()
	}

	// ARS.
	var a ars
	if a.rq, err = telemetry.LoadRunqlat(); err != nil {
		return err
	}
	defer a.rq.Close()
	if a.flt, err = telemetry.LoadFaults(); err != nil {
		return err
	}
	defer a.flt.Close()
	if a.bio, err = telemetry.LoadBlockIO(); err != nil {
		return err
	}
	defer a.bio.Close()
	for _, m := range []map[string]*ebpf.Program{a.rq.Programs(), a.flt.Programs(), a.bio.Programs()} {
		names := make([]string, 0, len(m))
		for n := range m {
			names = append(names, n)
		}
		sort.Strings(names)
		for _, n := range names {
			progs = append(progs, prog{"ars", n, m[n]})
		}
	}

	// Something tracked that is not running: a sleeping process, as a VM
	// whose vCPUs are idle.
	idle := exec.Command("sleep", "3600")
	if err := idle.Start(); err != nil {
		return err
	}
	defer func() { idle.Process.Kill(); idle.Wait() }()
	if err := a.track([]int{idle.Process.Pid}, []uint32{uint32(idle.Process.Pid)}); err != nil {
		return err
	}

	fmt.Fprintf(w, "bench-bpf: kernel %s, %d CPUs, stress-ng --switch %d, %v per load; all programs attached at once\n",
		kernel(), numCPU(), workers, dur)
	fmt.Fprintf(w, "reference: bpf/bench/ref.bpf.c (libbpf-tools runqlat design); floor: empty tp_btf/sched_switch\n\n")

	var untrackedARS, untrackedRef float64
	for _, load := range []string{"untracked", "tracked"} {
		d, err := measure(stressng, workers, dur, progs, func(pids []int, tids []uint32) error {
			if load == "tracked" {
				return a.track(pids, tids)
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("%s load: %w", load, err)
		}
		arsMean, refMean := report(w, load, progs, d)
		if load == "untracked" {
			untrackedARS, untrackedRef = arsMean, refMean
		}
		if e, err := a.rq.Errors(); err == nil && e != (telemetry.RunqlatErrors{}) {
			fmt.Fprintf(w, "  runqlat in-kernel errors: %+v\n", e)
		}
		fmt.Fprintln(w)
	}
	fmt.Fprintf(w, "bpf ns/event ars=%.1f reference=%.1f ratio=%.3f\n", untrackedARS, untrackedRef, untrackedARS/untrackedRef)
	return nil
}

// measure runs the storm and returns each program's runs and run time
// over the window; onStart gets the storm's PIDs and thread IDs before the
// window opens.
func measure(stressng string, workers int, dur time.Duration, progs []prog, onStart func([]int, []uint32) error) ([]delta, error) {
	secs := int((dur + 2*time.Second).Seconds())
	cmd := exec.Command(stressng, "--switch", strconv.Itoa(workers), "-t", strconv.Itoa(secs), "--quiet")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	defer func() {
		// SIGTERM: stress-ng stops and reaps its workers; then anything
		// left in its process group is killed.
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(3 * time.Second):
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-done
		}
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	}()
	time.Sleep(500 * time.Millisecond) // workers started
	pids := processTree(cmd.Process.Pid)
	var tids []uint32
	for _, p := range pids {
		tids = append(tids, threadsOf(p)...)
	}
	if len(tids) < 1+workers {
		return nil, fmt.Errorf("stress-ng: found threads %v only", tids)
	}
	if err := onStart(pids, tids); err != nil {
		return nil, err
	}
	before, err := snapshot(progs)
	if err != nil {
		return nil, err
	}
	time.Sleep(dur)
	after, err := snapshot(progs)
	if err != nil {
		return nil, err
	}
	out := make([]delta, len(progs))
	for i := range progs {
		out[i] = delta{runs: after[i].runs - before[i].runs, ns: after[i].ns - before[i].ns}
	}
	return out, nil
}

func report(w io.Writer, load string, progs []prog, d []delta) (arsMean, refMean float64) {
	refByName := map[string]float64{}
	total := map[string]delta{}
	for i, p := range progs {
		if p.group == "ref" {
			refByName[p.name] = d[i].perRun()
		}
		t := total[p.group]
		t.runs += d[i].runs
		t.ns += d[i].ns
		total[p.group] = t
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "%s load\tprogram\truns\tns/run\tratio to ref\t\n", load)
	for i, p := range progs {
		ratio := "-"
		if r, ok := refByName[p.name]; ok && r > 0 && p.group != "ref" {
			ratio = fmt.Sprintf("%.3f", d[i].perRun()/r)
		}
		fmt.Fprintf(tw, "\t%s/%s\t%d\t%.1f\t%s\t\n", p.group, p.name, d[i].runs, d[i].perRun(), ratio)
	}
	arsMean, refMean = total["ars"].perRun(), total["ref"].perRun()
	fmt.Fprintf(tw, "\tars total\t%d\t%.1f\t%.3f\t\n", total["ars"].runs, arsMean, arsMean/refMean)
	fmt.Fprintf(tw, "\tref total\t%d\t%.1f\t1.000\t\n", total["ref"].runs, refMean)
	fmt.Fprintf(tw, "\tfloor total\t%d\t%.1f\t%.3f\t\n", total["floor"].runs, total["floor"].perRun(), total["floor"].perRun()/refMean)
	tw.Flush()
	fmt.Fprintf(w, "%s: ars=%.1f reference=%.1f ratio=%.3f ns/event\n", load, arsMean, refMean, arsMean/refMean)
	return arsMean, refMean
}

// processTree is pid and its descendants.
func processTree(pid int) []int {
	out := []int{pid}
	for i := 0; i < len(out); i++ {
		for _, tid := range threadsOf(out[i]) {
			b, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(out[i]), "task", strconv.Itoa(int(tid)), "children"))
			for _, f := range strings.Fields(string(b)) {
				if c, err := strconv.Atoi(f); err == nil {
					out = append(out, c)
				}
			}
		}
	}
	return out
}

func threadsOf(pid int) []uint32 {
	ents, _ := os.ReadDir(filepath.Join("/proc", strconv.Itoa(pid), "task"))
	var tids []uint32
	for _, e := range ents {
		if n, err := strconv.Atoi(e.Name()); err == nil {
			tids = append(tids, uint32(n))
		}
	}
	return tids
}

func kernel() string {
	var u unix.Utsname
	if unix.Uname(&u) != nil {
		return "?"
	}
	return unix.ByteSliceToString(u.Release[:])
}

func numCPU() int {
	n, err := ebpf.PossibleCPU()
	if err != nil {
		return 0
	}
	return n
}
