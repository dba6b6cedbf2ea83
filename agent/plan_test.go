package agent

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/ars-dev/ars/agent/cgroups"
	"github.com/ars-dev/ars/agent/config"
	"github.com/ars-dev/ars/agent/executor"
	"github.com/ars-dev/ars/agent/status"
	"github.com/ars-dev/ars/mapper"
	"github.com/ars-dev/ars/synthesizer"
)

// hosts is several fakeHosts, one per cgroup.
type hosts map[string]*fakeHost

func (h hosts) read(g cgroups.Group) (cgroups.CPUStat, error) { return h[g.CPU].read(g) }
func (h hosts) ReadQuota(g cgroups.Group) (int64, uint64, error) {
	return h[g.CPU].ReadQuota(g)
}
func (h hosts) WriteQuota(g cgroups.Group, q int64) error { return h[g.CPU].WriteQuota(g, q) }

// TestLoopBorrowsThrottlesAndReturns: on a host of 1,000 m, a critical VM
// that ramps up borrows from a best-effort one (never below its floor),
// the loan is in the DRM, the status and the audit log; when both want
// more than the host has, the critical one is throttled and alerted; when
// it calms down the loan is returned.
func TestLoopBorrowsThrottlesAndReturns(t *testing.T) {
	h := hosts{"/hi": {want: 100, quotaUs: -1}, "/lo": {want: 500, quotaUs: -1}}
	clock := time.Unix(1000, 0)
	now := func() time.Time { return clock }
	cfg := config.Default()
	cfg.Predictor.Model = "ewma"
	cfg.VMs = map[string]synthesizer.SLA{
		"hi": {CPU: synthesizer.CPUSLA{FloorMillicores: 200, CeilingMillicores: 2000}, Class: synthesizer.Critical},
		"lo": {CPU: synthesizer.CPUSLA{FloorMillicores: 300, CeilingMillicores: 2000}, Class: synthesizer.BestEffort},
	}
	var audited []executor.Record
	board, drm := &status.Board{}, mapper.New()
	vms := &fakeVMs{vms: []VM{{Name: "hi", PID: 1, Group: cgroups.Group{CPU: "/hi"}}, {Name: "lo", PID: 2, Group: cgroups.Group{CPU: "/lo"}}}}
	l, err := New(cfg, Deps{VMs: vms, ReadCPU: h.read, Exec: executor.New(executor.Actuators{CPU: h}, nil, false, now, "test"),
		DRM: drm, Board: board, Log: slog.New(slog.NewTextHandler(io.Discard, nil)), Now: now,
		Capacity: synthesizer.Capacity{CPU: synthesizer.Quantity{Total: 1000}},
		Audit:    func(r executor.Record) error { audited = append(audited, r); return nil }}, "fake")
	if err != nil {
		t.Fatal(err)
	}
	step := func(n int) status.Snapshot {
		for i := 0; i < n; i++ {
			for _, x := range h {
				x.step()
			}
			clock = clock.Add(time.Second)
			l.Tick(context.Background())
		}
		return board.Latest()
	}
	step(15)
	// The high-priority VM ramps up to 700 m: the host has 1,000 m.
	h["/hi"].want = 700
	snap := step(10)
	hi, lo := h["/hi"].quotaUs/100, h["/lo"].quotaUs/100
	if hi < 700 || lo < 300 || hi+lo > 1000 {
		t.Fatalf("after ramp: hi %d m, lo %d m (want hi >= 700, lo >= its 300 floor, sum <= 1000)", hi, lo)
	}
	if len(snap.Loans) == 0 || snap.Loans[0].Lender != "lo" || snap.Loans[0].Borrower != "hi" {
		t.Fatalf("no loan from lo to hi in status: %+v", snap.Loans)
	}
	if d := drm.Snapshot(); len(d.Loans) == 0 || d.Loans[0].Amount != snap.Loans[0].Amount {
		t.Fatalf("DRM loans %+v, status %+v", d.Loans, snap.Loans)
	}
	if !hasKind(audited, "loan.cpu") {
		t.Fatalf("loan not audited: %+v", audited)
	}
	// More than the host has: hi throttled (lo at its floor), alert.
	h["/hi"].want = 1500
	snap = step(8)
	if h["/lo"].quotaUs/100 != 300 {
		t.Fatalf("lo at %d m, want its 300 floor", h["/lo"].quotaUs/100)
	}
	if snap.Throttled["hi/cpu"] == 0 || !hasKind(audited, "throttle.cpu") {
		t.Fatalf("throttling not counted/audited: %v %+v", snap.Throttled, audited)
	}
	// hi calms down: the loan is returned (after the dwell).
	h["/hi"].want = 100
	snap = step(40)
	if len(snap.Loans) != 0 {
		t.Fatalf("loan not returned: %+v", snap.Loans)
	}
	if !hasResult(audited, "returned") || !hasKind(audited, "throttle.end.cpu") {
		t.Fatalf("return/throttle end not audited: %+v", audited)
	}
}

func hasKind(rs []executor.Record, k string) bool {
	for _, r := range rs {
		if r.Kind == k {
			return true
		}
	}
	return false
}

func hasResult(rs []executor.Record, res string) bool {
	for _, r := range rs {
		if r.Result == res {
			return true
		}
	}
	return false
}
