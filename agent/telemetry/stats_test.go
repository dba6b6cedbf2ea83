package telemetry

import (
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestQuantile(t *testing.T) {
	var oneSlot VCPUStats
	oneSlot.Hist[10] = 100 // all in [1024, 2048)
	var twoSlots VCPUStats
	twoSlots.Hist[3] = 90  // [8, 16)
	twoSlots.Hist[20] = 10 // [1 Mi, 2 Mi)
	var top VCPUStats
	top.Hist[HistSlots-1] = 5
	cases := []struct {
		name string
		s    VCPUStats
		q    float64
		want float64
	}{
		{"empty", VCPUStats{}, 0.99, 0},
		{"one slot p0", oneSlot, 0, 1024},
		{"one slot p50", oneSlot, 0.5, 1536},
		{"one slot p100", oneSlot, 1, 2048},
		{"two slots p50 in first", twoSlots, 0.5, 8 + 8*(50.0/90)},
		{"two slots p90 at edge", twoSlots, 0.9, 16},
		{"two slots p99 in second", twoSlots, 0.99, 1<<20 + (1<<20)*(9.0/10)},
		{"q above 1 clamps", twoSlots, 7, 1 << 21},
		{"open-ended slot gives lower bound", top, 0.99, 1 << 31},
		{"NaN", oneSlot, math.NaN(), 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := c.s.Quantile(c.q); math.Abs(got-c.want) > 1e-6 {
				t.Errorf("Quantile(%g) = %g, want %g", c.q, got, c.want)
			}
		})
	}
}

func TestAddSub(t *testing.T) {
	a := VCPUStats{RunDelayNs: 10, Count: 2, OnCPUNs: 5, Involuntary: 1, Wakeups: 3}
	a.Hist[4] = 2
	b := a.Add(a)
	if b.RunDelayNs != 20 || b.Count != 4 || b.OnCPUNs != 10 || b.Involuntary != 2 || b.Wakeups != 6 || b.Hist[4] != 4 {
		t.Fatalf("Add: %+v", b)
	}
	if d := b.Sub(a); d != a {
		t.Fatalf("Sub: %+v, want %+v", d, a)
	}
	// Re-tracked thread: counters restarted below prev; report the new value.
	if d := a.Sub(b); d != a {
		t.Fatalf("Sub after reset: %+v, want %+v", d, a)
	}
	if m := a.MeanDelayNs(); m != 5 {
		t.Fatalf("MeanDelayNs = %g", m)
	}
}

func writeProc(t *testing.T, root string, tid, name, body string) {
	t.Helper()
	dir := filepath.Join(root, tid)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestReadKernelSample(t *testing.T) {
	root := t.TempDir()
	writeProc(t, root, "42", "schedstat", "725733516 1596614849 2806\n")
	writeProc(t, root, "42", "status", "Name:\tx\nvoluntary_ctxt_switches:\t685\nnonvoluntary_ctxt_switches:\t2121\n")
	k, err := ReadKernelSample(root, 42)
	if err != nil {
		t.Fatal(err)
	}
	want := KernelSample{OnCPUNs: 725733516, RunDelayNs: 1596614849, Timeslices: 2806, Nonvoluntary: 2121}
	if k != want {
		t.Fatalf("got %+v, want %+v", k, want)
	}

	writeProc(t, root, "43", "schedstat", "1 2\n")
	if _, _, _, err := ReadSchedstat(root, 43); err == nil || !strings.Contains(err.Error(), "want 3 fields") {
		t.Errorf("short schedstat: err = %v", err)
	}
	writeProc(t, root, "44", "schedstat", "1 x 3\n")
	if _, _, _, err := ReadSchedstat(root, 44); err == nil {
		t.Error("bad number: no error")
	}
	writeProc(t, root, "45", "status", "Name:\tx\n")
	if _, _, err := ReadCtxSwitches(root, 45); err == nil {
		t.Error("status without ctxt lines: no error")
	}
	if _, _, _, err := ReadSchedstat(root, 46); err == nil {
		t.Error("missing tid: no error")
	}
}

func TestCrossCheck(t *testing.T) {
	tol := CrossCheckTolerance{
		RunDelay:    Tolerance{Rel: 0.05, Abs: 1000},
		Count:       Tolerance{Abs: 1},
		OnCPU:       Tolerance{Rel: 0.05, Abs: 1000},
		Involuntary: Tolerance{},
	}
	before := Sample{
		BPF:    map[uint32]VCPUStats{1: {RunDelayNs: 100, Count: 1}, 2: {}},
		Kernel: map[uint32]KernelSample{1: {RunDelayNs: 50, Timeslices: 1}, 2: {}},
	}
	after := Sample{
		BPF: map[uint32]VCPUStats{
			1: {RunDelayNs: 100 + 1_040_000, Count: 11, OnCPUNs: 500, Involuntary: 3},
			2: {RunDelayNs: 2_000_000, Count: 5, Involuntary: 1},
		},
		Kernel: map[uint32]KernelSample{
			1: {RunDelayNs: 50 + 1_000_000, Timeslices: 11, OnCPUNs: 1200, Nonvoluntary: 3},
			2: {RunDelayNs: 1_000_000, Timeslices: 5},
		},
	}
	got, err := CrossCheck(before, after, []uint32{2, 1}, tol)
	if len(got) != 2 || got[0].TID != 1 || got[0].BPF.RunDelayNs != 1_040_000 || got[0].Kernel.RunDelayNs != 1_000_000 {
		t.Fatalf("agreements: %v", got)
	}
	if err == nil {
		t.Fatal("tid 2 is 100% off but CrossCheck passed")
	}
	msg := err.Error()
	if strings.Contains(msg, "tid 1") {
		t.Errorf("tid 1 (4%% run delay, 700 ns on-CPU off) reported: %v", err)
	}
	for _, want := range []string{"tid 2: run delay ns", "tid 2: involuntary switches"} {
		if !strings.Contains(msg, want) {
			t.Errorf("error %q does not mention %q", msg, want)
		}
	}
	if _, err := CrossCheck(before, after, []uint32{3}, tol); err == nil || !strings.Contains(err.Error(), "missing") {
		t.Errorf("unknown tid: err = %v", err)
	}
}

func TestToleranceAllows(t *testing.T) {
	tol := Tolerance{Rel: 0.05, Abs: 100, PerEvent: 10}
	cases := []struct {
		bpf, kernel, events uint64
		want                bool
	}{
		{1000, 1000, 0, true},
		{1050, 1000, 0, true},  // 5% = 50, abs 100
		{1100, 1000, 0, true},  // abs 100
		{1101, 1000, 0, false}, // beyond both
		{1101, 1000, 1, true},  // 100 + 10
		{900, 1000, 0, true},   // symmetric
		{10_500, 10_000, 0, true},
		{10_501, 10_000, 0, false},
		{0, 0, 0, true},
	}
	for _, c := range cases {
		if got := tol.Allows(c.bpf, c.kernel, c.events); got != c.want {
			t.Errorf("%v.Allows(%d, %d, %d) = %t, want %t", tol, c.bpf, c.kernel, c.events, got, c.want)
		}
	}
}
