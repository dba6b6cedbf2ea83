//go:build linux

package telemetry

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/ars-dev/ars/internal/testutil"
)

// BenchmarkRunqlatOverhead measures what the programs cost per event with
// BPF_STATS_RUN_TIME while `stress-ng --switch 2` makes context switches:
// an empty tp_btf/sched_switch program (the floor), runqlat with nothing
// tracked (what the host's other work pays), and runqlat tracking every
// stress-ng thread (worst case). One iteration is enough:
//
//	go test -run '^$' -bench RunqlatOverhead -benchtime 1x ./agent/telemetry/
func BenchmarkRunqlatOverhead(b *testing.B) {
	testutil.RequireBTF(b)
	stressng := testutil.RequireCommand(b, "stress-ng")
	const window = 3 * time.Second

	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		b.Fatalf("enable BPF run-time stats: %v", err)
	}
	defer stats.Close()

	for b.Loop() {
		// Floor: the same attach point, no work.
		spec, err := loadRunqlat()
		if err != nil {
			b.Fatal(err)
		}
		var empty struct {
			Prog *ebpf.Program `ebpf:"test_empty_switch"`
		}
		if err := spec.LoadAndAssign(&empty, nil); err != nil {
			b.Fatal(verifierDetail(err))
		}
		l, err := link.AttachTracing(link.TracingOptions{Program: empty.Prog, AttachType: ebpf.AttachTraceRawTp})
		if err != nil {
			b.Fatal(err)
		}
		runStress(b, stressng, window, nil)
		report(b, "empty-switch", empty.Prog)
		l.Close()
		empty.Prog.Close()

		r, err := LoadRunqlat()
		if err != nil {
			b.Fatal(err)
		}
		runStress(b, stressng, window, nil)
		report(b, "untracked-switch", r.progs.Switch)
		report(b, "untracked-wakeup", r.progs.Wakeup)
		r.Close()

		r, err = LoadRunqlat()
		if err != nil {
			b.Fatal(err)
		}
		runStress(b, stressng, window, func(pid int) {
			for _, tid := range threadsOf(b, pid) {
				if err := r.Track(tid, 0, 0); err != nil {
					b.Fatal(err)
				}
			}
		})
		report(b, "tracked-switch", r.progs.Switch)
		report(b, "tracked-wakeup", r.progs.Wakeup)
		if e, err := r.Errors(); err != nil || e != (RunqlatErrors{}) {
			b.Errorf("in-kernel errors %+v (err %v)", e, err)
		}
		r.Close()
	}
}

// runStress runs stress-ng --switch 2 for d; track, if set, is called with
// the parent PID once the workers have started.
func runStress(b *testing.B, stressng string, d time.Duration, track func(pid int)) {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d+10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, stressng, "--switch", "2", "-t", strconv.Itoa(int(d.Seconds())), "--quiet")
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	if track != nil {
		time.Sleep(300 * time.Millisecond)
		track(cmd.Process.Pid)
	}
	if err := cmd.Wait(); err != nil {
		b.Fatalf("stress-ng: %v", err)
	}
}

// threadsOf returns every thread of pid and of its direct children.
func threadsOf(b *testing.B, pid int) []uint32 {
	b.Helper()
	var tids []uint32
	pids := []int{pid}
	children, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "task", strconv.Itoa(pid), "children"))
	for _, f := range splitInts(string(children)) {
		pids = append(pids, f)
	}
	for _, p := range pids {
		ents, _ := os.ReadDir(filepath.Join("/proc", strconv.Itoa(p), "task"))
		for _, e := range ents {
			if n, err := strconv.Atoi(e.Name()); err == nil {
				tids = append(tids, uint32(n))
			}
		}
	}
	if len(tids) < 3 {
		b.Fatalf("stress-ng %d: found only threads %v", pid, tids)
	}
	return tids
}

func splitInts(s string) []int {
	var out []int
	n, in := 0, false
	for _, c := range s + " " {
		if c >= '0' && c <= '9' {
			n, in = n*10+int(c-'0'), true
		} else if in {
			out = append(out, n)
			n, in = 0, false
		}
	}
	return out
}

func report(b *testing.B, name string, p *ebpf.Program) {
	b.Helper()
	s, err := p.Stats()
	if err != nil {
		b.Fatal(err)
	}
	if s.RunCount == 0 {
		b.Fatalf("%s: program never ran", name)
	}
	perRun := float64(s.Runtime.Nanoseconds()) / float64(s.RunCount)
	b.ReportMetric(perRun, name+"-ns/run")
	b.Logf("%s: %d runs, %.0f ns/run", name, s.RunCount, perRun)
}
