package replica

import (
	"context"
	"fmt"
	"path/filepath"
	"sort"
	"testing"
	"time"

	"github.com/ars-dev/ars/agent/executor"
	"github.com/ars-dev/ars/internal/testutil"
	"github.com/ars-dev/ars/mapper"
)

func fleet(n int) *mapper.Table {
	t := mapper.New()
	for i := 0; i < n; i++ {
		t.Put(mapper.VM{Name: fmt.Sprintf("vm%03d", i), PID: 1000 + i, VCPUs: []mapper.VCPU{{Index: 0, TID: 2000 + i}},
			CPU: mapper.CPU{Cgroup: fmt.Sprintf("/sys/fs/cgroup/cpu/vm%03d", i), QuotaUs: 20000, PeriodUs: 100000, Millicores: 200}})
	}
	return t
}

func start(t testing.TB, drm *mapper.Table, epoch uint64, interval time.Duration) (*Follower, string, context.CancelFunc) {
	t.Helper()
	testutil.RequirePrivileged(t) // the stream serves root peers only
	sock := filepath.Join(t.TempDir(), "repl.sock")
	ctx, cancel := context.WithCancel(context.Background())
	pub := &Publisher{Path: sock, Holder: "active", State: func() (uint64, mapper.Snapshot, executor.Head) {
		return epoch, drm.Snapshot(), executor.Head{Seq: 7, Hash: "abc"}
	}, Interval: interval}
	done := make(chan struct{})
	go func() { defer close(done); pub.Serve(ctx) }()
	f := &Follower{Path: sock}
	fctx, fcancel := context.WithCancel(context.Background())
	go f.Run(fctx)
	stop := func() { cancel(); <-done; fcancel() }
	t.Cleanup(stop)
	return f, sock, func() { cancel(); <-done }
}

func waitGen(t testing.TB, f *Follower, gen uint64, limit time.Duration) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for f.Hot().DRM.Generation < gen {
		if time.Now().After(deadline) {
			t.Fatalf("hot copy at generation %d, want %d", f.Hot().DRM.Generation, gen)
		}
		time.Sleep(100 * time.Microsecond)
	}
}

// TestStandbyFollowsActive: the hot copy reaches the active's generation,
// holds the DRM and the audit head, and survives the active's restart.
func TestStandbyFollowsActive(t *testing.T) {
	drm := fleet(3)
	f, sock, stopActive := start(t, drm, 4, 5*time.Millisecond)
	waitGen(t, f, drm.Snapshot().Generation, 2*time.Second)
	h := f.Hot()
	if h.Epoch != 4 || h.Holder != "active" || len(h.DRM.VMs) != 3 || h.AuditHead.Seq != 7 || !h.Connected {
		t.Fatalf("hot copy %+v", h)
	}
	gen, _ := drm.SetCPU("vm001", mapper.CPU{QuotaUs: 50000, PeriodUs: 100000, Millicores: 500})
	waitGen(t, f, gen, time.Second)
	if vm := f.Hot().DRM.VMs[1]; vm.CPU.QuotaUs != 50000 {
		t.Fatalf("change not replicated: %+v", vm)
	}
	// The active goes away: the copy stays, its lag grows, and a new
	// active on the same socket is followed again.
	stopActive()
	time.Sleep(300 * time.Millisecond)
	if h := f.Hot(); h.Lag < 250*time.Millisecond || len(h.DRM.VMs) != 3 {
		t.Fatalf("after the active left: %+v", h)
	}
	drm.Remove("vm002")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go (&Publisher{Path: sock, State: func() (uint64, mapper.Snapshot, executor.Head) {
		return 5, drm.Snapshot(), executor.Head{}
	}}).Serve(ctx)
	waitGen(t, f, drm.Snapshot().Generation, 2*time.Second)
	if h := f.Hot(); h.Epoch != 5 || len(h.DRM.VMs) != 2 {
		t.Fatalf("new active not followed: %+v", h)
	}
}

// BenchmarkReplicationLag100VMs: a DRM of 100 VMs changing every
// iteration; the time from a change on the active to the standby's hot
// copy holding it (p50/p95/max in µs), with the production interval
// (the active looks at the generation every 20 ms).
func BenchmarkReplicationLag100VMs(b *testing.B) {
	drm := fleet(100)
	f, _, _ := start(b, drm, 1, 0) // the production interval (20 ms)
	waitGen(b, f, drm.Snapshot().Generation, 2*time.Second)
	lags := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		gen, _ := drm.SetCPU(fmt.Sprintf("vm%03d", i%100), mapper.CPU{QuotaUs: int64(20000 + i%1000), PeriodUs: 100000})
		waitGen(b, f, gen, 2*time.Second)
		lags = append(lags, time.Since(t0))
	}
	b.StopTimer()
	sort.Slice(lags, func(i, j int) bool { return lags[i] < lags[j] })
	q := func(p float64) time.Duration { return lags[int(p*float64(len(lags)-1))] }
	b.ReportMetric(float64(q(0.5).Microseconds()), "p50-µs")
	b.ReportMetric(float64(q(0.95).Microseconds()), "p95-µs")
	b.ReportMetric(float64(lags[len(lags)-1].Microseconds()), "max-µs")
}
