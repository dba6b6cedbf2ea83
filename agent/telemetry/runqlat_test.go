//go:build linux

package telemetry

import (
	"testing"
	"time"

	"github.com/ars-dev/ars/internal/testutil"
)

func newRunqlat(t testing.TB) *Runqlat {
	t.Helper()
	testutil.RequireBTF(t)
	r, err := LoadRunqlat()
	if err != nil {
		t.Fatalf("LoadRunqlat: %v", err)
	}
	t.Cleanup(func() {
		if err := r.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return r
}

// TestRunqlatMatchesSchedstat runs threads that contend for one CPU, tracks
// all but one, and checks the eBPF counters against the kernel's own
// accounting over the same 3 s window, with DefaultCrossCheckTolerance:
// run delay within max(5%, 2 ms + 10 µs per switch-in) of schedstat's
// run_delay, on-CPU within max(5%, 4 ms + 10 µs per switch-in), Count within
// max(1%, 10) of timeslices, Involuntary within max(0.5%, 2) of
// nonvoluntary_ctxt_switches. Measured worst case: 1.6%, 4.7%, 8, 0.
func TestRunqlatMatchesSchedstat(t *testing.T) {
	r := newRunqlat(t)
	patterns := []pattern{
		{Name: "spinner", Spin: time.Second}, // only ever preempted
		{Name: "duty-2ms/1ms", Spin: 2 * time.Millisecond, Sleep: time.Millisecond},
		{Name: "short-100us/500us", Spin: 100 * time.Microsecond, Sleep: 500 * time.Microsecond},
		{Name: "untracked-spinner", Spin: time.Second},
	}
	c := startContention(t, lastAllowedCPU(t), patterns)
	tracked, untracked := c.tids[:3], c.tids[3]
	for i, tid := range tracked {
		if err := r.Track(tid, 7, uint32(i)); err != nil {
			t.Fatal(err)
		}
	}
	before, err := r.Sample("/proc", tracked)
	if err != nil {
		t.Fatal(err)
	}
	c.run(3 * time.Second)
	after, err := r.Sample("/proc", tracked)
	if err != nil {
		t.Fatal(err)
	}

	name := make(map[uint32]string)
	for i, tid := range c.tids {
		name[tid] = patterns[i].Name
	}
	got, err := CrossCheck(before, after, tracked, DefaultCrossCheckTolerance())
	for _, a := range got {
		t.Logf("%s: %v; rel err run_delay %.3f%% oncpu %.3f%%; p50 %.0f ns p99 %.0f ns",
			name[a.TID], a, 100*RelErr(a.BPF.RunDelayNs, a.Kernel.RunDelayNs),
			100*RelErr(a.BPF.OnCPUNs, a.Kernel.OnCPUNs), a.BPF.Quantile(0.5), a.BPF.Quantile(0.99))
	}
	if err != nil {
		t.Error(err)
	}
	for _, a := range got {
		if a.BPF.Count == 0 || a.Kernel.RunDelayNs == 0 {
			t.Errorf("%s: no contention measured (count %d, kernel run_delay %d)", name[a.TID], a.BPF.Count, a.Kernel.RunDelayNs)
		}
	}
	if _, ok := after.BPF[untracked]; ok {
		t.Errorf("untracked thread %d has an entry", untracked)
	}
	if len(after.BPF) != len(tracked) {
		t.Errorf("stats has %d entries, want %d", len(after.BPF), len(tracked))
	}
	e, err := r.Errors()
	if err != nil {
		t.Fatal(err)
	}
	if e != (RunqlatErrors{}) {
		t.Errorf("in-kernel errors: %+v", e)
	}
}

// TestRunqlatTrackUntrack checks the lifecycle of a tracked thread's
// entries: Track creates them, re-Track keeps the counters, Untrack drops
// them, and an untracked thread never gets one.
func TestRunqlatTrackUntrack(t *testing.T) {
	r := newRunqlat(t)
	if err := r.Track(0, 0, 0); err == nil {
		t.Error("Track(0) accepted the idle task")
	}
	c := startContention(t, lastAllowedCPU(t), []pattern{
		{Name: "sleeper", Spin: 50 * time.Microsecond, Sleep: 200 * time.Microsecond},
		{Name: "spinner", Spin: time.Second},
	})
	tid := c.tids[0]
	if err := r.Track(tid, 1, 2); err != nil {
		t.Fatal(err)
	}
	c.run(300 * time.Millisecond)
	s1, err := r.Read()
	if err != nil {
		t.Fatal(err)
	}
	if len(s1) != 1 {
		t.Fatalf("Read has %d entries, want 1 (tid %d): %v", len(s1), tid, s1)
	}
	got := s1[tid]
	if got.Count == 0 || got.Wakeups == 0 || got.OnCPUNs == 0 || got.RunDelayNs == 0 {
		t.Fatalf("tid %d after 300 ms of contention: %+v", tid, got)
	}
	var hist uint64
	for _, n := range got.Hist {
		hist += n
	}
	if hist != got.Count {
		t.Errorf("histogram holds %d samples, Count is %d", hist, got.Count)
	}
	// Re-tracking (new labels) keeps the counters.
	if err := r.Track(tid, 1, 3); err != nil {
		t.Fatal(err)
	}
	if s2, err := r.Read(); err != nil || s2[tid].Count != got.Count {
		t.Errorf("after re-Track: count %d, want %d (err %v)", s2[tid].Count, got.Count, err)
	}
	if err := r.Untrack(tid); err != nil {
		t.Fatal(err)
	}
	if err := r.Untrack(tid); err != nil {
		t.Errorf("second Untrack: %v", err)
	}
	if s3, err := r.Read(); err != nil || len(s3) != 0 {
		t.Errorf("after Untrack: %v (err %v)", s3, err)
	}
	if err := r.Track(tid, 1, 2); err != nil {
		t.Fatal(err)
	}
	if s4, err := r.Read(); err != nil || s4[tid].Count != 0 {
		t.Errorf("after Untrack+Track: %+v, want zero counters (err %v)", s4[tid], err)
	}
}
