//go:build linux

package telemetry

import (
	"fmt"
	"math"
	"math/bits"
	"math/rand/v2"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/ars-dev/ars/internal/testutil"
)

// wantSlot is the Go statement of bpf/hist.h's hist_slot.
func wantSlot(ns uint64) uint32 {
	if ns == 0 {
		return 0
	}
	return uint32(min(bits.Len64(ns)-1, HistSlots-1))
}

// TestHistSlotBPF runs the C helper hist_slot in the kernel through
// BPF_PROG_TEST_RUN (SEC("syscall") test_hist_slot) and checks every
// bucket edge and random values against the Go statement.
func TestHistSlotBPF(t *testing.T) {
	testutil.RequireBTF(t)
	spec, err := loadRunqlat()
	if err != nil {
		t.Fatal(err)
	}
	var objs struct {
		Prog *ebpf.Program `ebpf:"test_hist_slot"`
	}
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		t.Fatalf("load test_hist_slot: %v", verifierDetail(err))
	}
	t.Cleanup(func() { objs.Prog.Close() })

	run := func(t *testing.T, ns uint64) uint32 {
		t.Helper()
		ret, err := objs.Prog.Run(&ebpf.RunOptions{Context: runqlatHistSlotTest{DelayNs: ns}})
		if err != nil {
			t.Fatalf("prog.Run(%d): %v", ns, err)
		}
		return ret
	}

	cases := []struct {
		ns   uint64
		want uint32
	}{
		{0, 0}, {1, 0}, {2, 1}, {3, 1}, {4, 2}, {7, 2}, {8, 3},
		{1023, 9}, {1024, 10}, {1025, 10},
		{1_000_000, 19}, // 1 ms
		{1<<31 - 1, 30}, // just below the open-ended slot
		{1 << 31, 31},   // first value of the last slot (~2.1 s)
		{1 << 32, 31},   // clamped
		{1<<32 - 1, 31}, // high 32 bits zero, low all ones
		{1<<32 + 1, 31}, // crosses the 32-bit half
		{math.MaxUint64, 31},
	}
	for _, c := range cases {
		t.Run(fmt.Sprint(c.ns), func(t *testing.T) {
			if c.want != wantSlot(c.ns) {
				t.Fatalf("table disagrees with wantSlot(%d) = %d", c.ns, wantSlot(c.ns))
			}
			if got := run(t, c.ns); got != c.want {
				t.Errorf("hist_slot(%d) = %d, want %d", c.ns, got, c.want)
			}
		})
	}
	t.Run("edges", func(t *testing.T) {
		for i := 1; i < 64; i++ {
			for _, ns := range []uint64{1<<i - 1, 1 << i, 1<<i + 1} {
				if got, want := run(t, ns), wantSlot(ns); got != want {
					t.Errorf("hist_slot(%d) = %d, want %d", ns, got, want)
				}
			}
		}
	})
	t.Run("random", func(t *testing.T) {
		rng := rand.New(rand.NewPCG(1, 2))
		for range 500 {
			ns := rng.Uint64() >> rng.IntN(64)
			if got, want := run(t, ns), wantSlot(ns); got != want {
				t.Errorf("hist_slot(%d) = %d, want %d", ns, got, want)
			}
		}
	})
}

// TestRunqlatObjectMatchesGo checks the constants Go keeps by hand against
// the compiled object (no kernel needed).
func TestRunqlatObjectMatchesGo(t *testing.T) {
	spec, err := loadRunqlat()
	if err != nil {
		t.Fatal(err)
	}
	if got := spec.Maps["errors"].MaxEntries; got != errKinds {
		t.Errorf("errors map has %d entries, Go knows %d kinds", got, errKinds)
	}
	if got := len(runqlatVcpuStats{}.Hist); got != HistSlots {
		t.Errorf("C histogram has %d slots, Go %d", got, HistSlots)
	}
	for _, name := range []string{"runqlat_switch", "runqlat_wakeup", "runqlat_wakeup_new"} {
		if spec.Programs[name] == nil {
			t.Errorf("program %s missing", name)
		}
	}
}
