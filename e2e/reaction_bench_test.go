package e2e

import (
	"context"
	"fmt"
	"path/filepath"
	"sort"
	"testing"
	"time"

	"github.com/ars-dev/ars/agent/cgroups"
	"github.com/ars-dev/ars/internal/vm"
)

// BenchmarkReactionTime (issue 6): the real arsd on its default tuning
// manages the shared TCG guest; the guest's load steps from idle to one
// busy vCPU, and the host polls the VM's cgroup quota every 5 ms. Each
// step's reaction is the time from the load command's return (host
// clock) to the first quota raise of at least 100 m, and to the quota
// reaching 0.9 core. Between steps the load drops to idle and the quota
// is let back down (≤ 300 m). Reports p50/p95/max over b.N × 20 steps.
//
//	go test -run '^$' -bench ReactionTime -benchtime 1x ./e2e/
func BenchmarkReactionTime(b *testing.B) {
	v := guest.Get(b)
	cpuDir := v.Cgroup.Dirs["cpu"]
	b.Cleanup(func() { cgroups.WriteFile(filepath.Join(cpuDir, "cpu.cfs_quota_us"), "-1") })
	work := b.TempDir()
	arsd := build(b, "./cmd/arsd", work)
	quota := func() int64 { return readQuota(b, cpuDir) }
	waitQ := func(limit time.Duration, cond func(int64) bool) (time.Duration, bool) {
		start := time.Now()
		for time.Since(start) < limit {
			if cond(quota()) {
				return time.Since(start), true
			}
			time.Sleep(5 * time.Millisecond)
		}
		return limit, false
	}
	setLoadB := func(p int) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := v.SetLoad(ctx, vm.Load{CPUPercent: p}); err != nil {
			b.Fatal(err)
		}
	}
	setLoadB(0)
	b.Cleanup(func() { setLoadB(0) })
	p := startArsd(b, arsd, "--qmp-dir", qmpDir, "--control-socket", filepath.Join(work, "arsd.sock"),
		"--metrics-addr", "off", "--state-dir", filepath.Join(work, "state"))
	defer p.stop()
	if _, ok := waitQ(30*time.Second, func(q int64) bool { return q > 0 && q <= 30000 }); !ok {
		b.Fatalf("idle guest not at its floor after 30 s (quota %d)", quota())
	}
	const steps = 20
	var first, full []time.Duration
	b.ResetTimer()
	for n := 0; n < b.N; n++ {
		for i := 0; i < steps; i++ {
			q0 := quota()
			setLoadB(100)
			d1, ok1 := waitQ(10*time.Second, func(q int64) bool { return q < 0 || q >= q0+10000 })
			d2, ok2 := waitQ(10*time.Second, func(q int64) bool { return q < 0 || q >= 90000 })
			if !ok1 || !ok2 {
				b.Fatalf("step %d: no reaction within 10 s (quota %d, was %d)", i, quota(), q0)
			}
			first, full = append(first, d1), append(full, d1+d2)
			setLoadB(0)
			if _, ok := waitQ(90*time.Second, func(q int64) bool { return q > 0 && q <= 30000 }); !ok {
				b.Fatalf("step %d: quota %d not back to ≤ 300 m 90 s after the load dropped", i, quota())
			}
		}
	}
	b.StopTimer()
	report := func(name string, ds []time.Duration) {
		sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
		pct := func(p float64) time.Duration { return ds[min(len(ds)-1, int(p*float64(len(ds))))] }
		b.ReportMetric(float64(pct(0.5).Milliseconds()), name+"_p50_ms")
		b.ReportMetric(float64(pct(0.95).Milliseconds()), name+"_p95_ms")
		b.ReportMetric(float64(ds[len(ds)-1].Milliseconds()), name+"_max_ms")
		fmt.Printf("reaction %s over %d steps: p50 %v p95 %v max %v\n", name, len(ds),
			pct(0.5).Round(time.Millisecond), pct(0.95).Round(time.Millisecond), ds[len(ds)-1].Round(time.Millisecond))
	}
	report("first_raise", first)
	report("to_0.9core", full)
}
