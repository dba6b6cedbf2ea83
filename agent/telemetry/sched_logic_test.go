//go:build linux

package telemetry

import (
	"testing"

	"github.com/cilium/ebpf"

	"github.com/ars-dev/ars/internal/testutil"
)

// TestSchedLogicBPF drives runqlat's scheduler logic (handle_wakeup,
// handle_switch: the code the tp_btf programs run) through
// BPF_PROG_TEST_RUN with chosen event times, on the real maps, and checks
// the early exit for untracked tasks, the delta math and the histogram.
func TestSchedLogicBPF(t *testing.T) {
	testutil.RequireBTF(t)
	spec, err := loadRunqlat()
	if err != nil {
		t.Fatal(err)
	}
	var objs struct {
		runqlatMaps
		Prog *ebpf.Program `ebpf:"test_sched"`
	}
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		t.Fatalf("load test_sched: %v", verifierDetail(err))
	}
	t.Cleanup(func() { objs.Prog.Close(); objs.runqlatMaps.Close() })
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		t.Fatal(err)
	}
	r := &Runqlat{maps: objs.runqlatMaps, ncpu: ncpu} // Track, Untrack, Errors on these maps
	const (
		tid       = 1001
		untracked = 2002
		running   = 0 // TASK_RUNNING: preempted
		sleeping  = 1 // TASK_INTERRUPTIBLE: blocks
	)
	if err := r.Track(tid, 1, 0); err != nil {
		t.Fatal(err)
	}
	run := func(ev runqlatSchedTest) uint32 {
		t.Helper()
		ret, err := objs.Prog.Run(&ebpf.RunOptions{Context: ev})
		if err != nil {
			t.Fatal(err)
		}
		return ret
	}
	wake := func(tid uint32, now uint64) uint32 { return run(runqlatSchedTest{NowNs: now, Op: 0, Tid: tid}) }
	sw := func(prev, next uint32, prevState int32, preempt bool, now uint64) uint32 {
		p := uint32(0)
		if preempt {
			p = 1
		}
		return run(runqlatSchedTest{NowNs: now, Op: 1, PrevTid: prev, NextTid: next, PrevState: prevState, Preempt: p})
	}
	stats := func() VCPUStats {
		t.Helper()
		got, err := r.readStats() // Read would add the slice in progress at the real clock
		if err != nil {
			t.Fatal(err)
		}
		return got[tid]
	}

	// Untracked tasks exit early: return 0, create nothing, count nothing.
	if wake(untracked, 10) != 0 || sw(untracked, untracked+1, running, true, 20) != 0 {
		t.Error("untracked events did not take the early exit")
	}
	if n := countKeys(t, objs.State); n != 1 {
		t.Errorf("state map has %d entries after untracked events, want 1 (the tracked tid)", n)
	}

	steps := []struct {
		name string
		do   func() uint32
		want VCPUStats // cumulative, Hist checked separately
	}{
		{"wakeup starts the wait", func() uint32 { return wake(tid, 1000) }, VCPUStats{Wakeups: 1}},
		{"second wakeup keeps the earliest start", func() uint32 { return wake(tid, 1200) }, VCPUStats{Wakeups: 2}},
		{"switch-in ends it: delay 500", func() uint32 { return sw(untracked, tid, sleeping, false, 1500) },
			VCPUStats{Wakeups: 2, Count: 1, RunDelayNs: 500}},
		{"preempted: on-CPU 2000, involuntary, waits again", func() uint32 { return sw(tid, untracked, running, true, 3500) },
			VCPUStats{Wakeups: 2, Count: 1, RunDelayNs: 500, OnCPUNs: 2000, Involuntary: 1}},
		{"switch-in after preemption: delay 4000", func() uint32 { return sw(untracked, tid, running, false, 7500) },
			VCPUStats{Wakeups: 2, Count: 2, RunDelayNs: 4500, OnCPUNs: 2000, Involuntary: 1}},
		{"blocks: on-CPU 1000, voluntary, no wait", func() uint32 { return sw(tid, untracked, sleeping, false, 8500) },
			VCPUStats{Wakeups: 2, Count: 2, RunDelayNs: 4500, OnCPUNs: 3000, Involuntary: 1}},
		{"switch-in without wakeup: no delay counted", func() uint32 { return sw(untracked, tid, running, false, 9000) },
			VCPUStats{Wakeups: 2, Count: 2, RunDelayNs: 4500, OnCPUNs: 3000, Involuntary: 1}},
		{"switch to itself (tracked both sides)", func() uint32 { return sw(tid, tid, running, true, 9100) },
			VCPUStats{Wakeups: 2, Count: 3, RunDelayNs: 4500, OnCPUNs: 3100, Involuntary: 2}},
		{"blocks", func() uint32 { return sw(tid, untracked, sleeping, false, 9200) },
			VCPUStats{Wakeups: 2, Count: 3, RunDelayNs: 4500, OnCPUNs: 3200, Involuntary: 2}},
	}
	for _, s := range steps {
		if s.do() != 1 {
			t.Fatalf("%s: tracked event took the early exit", s.name)
		}
		got := stats()
		got.Hist = [HistSlots]uint64{}
		if got != s.want {
			t.Fatalf("%s:\n got %+v\nwant %+v", s.name, got, s.want)
		}
	}
	got := stats()
	var want [HistSlots]uint64
	want[wantSlot(500)]++
	want[wantSlot(4000)]++
	want[0]++ // the 0 ns self-switch
	if got.Hist != want {
		t.Errorf("histogram %v, want %v", got.Hist, want)
	}

	// A switch-in earlier than the wait start is dropped and counted.
	wake(tid, 20000)
	sw(untracked, tid, running, false, 19000)
	if e, err := r.Errors(); err != nil || e.Clock != 1 {
		t.Errorf("errors %+v (%v), want Clock 1", e, err)
	}
	if s := stats(); s.Count != 3 {
		t.Errorf("Count %d after a backwards clock, want 3", s.Count)
	}
}

func countKeys(t *testing.T, m *ebpf.Map) int {
	t.Helper()
	var (
		k   uint32
		n   int
		val []byte
	)
	it := m.Iterate()
	for it.Next(&k, &val) {
		n++
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return n
}
