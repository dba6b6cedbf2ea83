package main

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/ars-dev/ars/agent/cgroups"
	"github.com/ars-dev/ars/agent/executor"
	"github.com/ars-dev/ars/agent/lease"
)

type memCPU struct{ q int64 }

func (m *memCPU) ReadQuota(cgroups.Group) (int64, uint64, error) { return m.q, 100000, nil }
func (m *memCPU) WriteQuota(_ cgroups.Group, q int64) error      { m.q = q; return nil }

type term struct {
	epoch uint64
	exec  *fencedExec
}

// newRoles builds roles on the lease at path whose act reports each term
// and waits for its end.
func newRoles(t *testing.T, path, role string, cpu *memCPU, now func() time.Duration) (*roles, chan term, *lease.Local) {
	t.Helper()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	l, err := lease.NewLocal(lease.LocalConfig{Path: path, TTL: time.Second, Log: log, Now: now})
	if err != nil {
		t.Fatal(err)
	}
	ex := executor.New(executor.Actuators{CPU: cpu}, nil, false, time.Now, "t").WithFence(leaseFence(l))
	terms := make(chan term, 4)
	r := &roles{role: role, lease: l, exec: ex, state: &roleState{}, log: log}
	r.act = func(ctx context.Context, epoch uint64, lost func(error)) error {
		terms <- term{epoch, &fencedExec{inner: ex, lease: l, lost: lost, log: log}}
		<-ctx.Done()
		return nil
	}
	return r, terms, l
}

func runRoles(t *testing.T, r *roles) (context.CancelFunc, chan error) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return cancel, done
}

func nextTerm(t *testing.T, terms chan term) term {
	t.Helper()
	select {
	case tm := <-terms:
		return tm
	case <-time.After(5 * time.Second):
		t.Fatal("no term began")
	}
	return term{}
}

func TestRolesTakeoverStepDownAndActiveRole(t *testing.T) {
	path := filepath.Join(t.TempDir(), "lease")
	cpu := &memCPU{q: -1}
	a, aTerms, _ := newRoles(t, path, roleAuto, cpu, nil)
	b, bTerms, _ := newRoles(t, path, roleAuto, cpu, nil)
	stopA, _ := runRoles(t, a)
	ta := nextTerm(t, aTerms)
	if ta.epoch != 1 {
		t.Fatalf("a's epoch %d", ta.epoch)
	}
	runRoles(t, b)
	select {
	case <-bTerms:
		t.Fatal("b acted while a holds the lease")
	case <-time.After(300 * time.Millisecond):
	}
	// --role active refuses to start beside a live active.
	c, _, _ := newRoles(t, path, roleActive, cpu, nil)
	if err := c.run(context.Background()); !errors.Is(err, lease.ErrHeld) {
		t.Fatalf("--role active beside a live active: %v", err)
	}
	// a stops cleanly: b takes over at once.
	start := time.Now()
	stopA()
	tb := nextTerm(t, bTerms)
	t.Logf("b active at epoch %d, %v after a stopped", tb.epoch, time.Since(start))
	if tb.epoch != 2 {
		t.Fatalf("b's epoch %d", tb.epoch)
	}
	act := executor.Action{VM: "vm", Kind: executor.KindCPUQuota, Group: cgroups.Group{CPU: "/vm"}, Millicores: 500, Epoch: 2}
	if r := tb.exec.Apply(context.Background(), []executor.Action{act}); r[0].Outcome != executor.Applied {
		t.Fatalf("b's write: %+v", r)
	}
	// A third agent whose clock says b's renewal is long expired (b
	// "stopped") takes epoch 3; b's next plan is refused and it steps down.
	far := func() time.Duration { return lease.Boottime() + time.Hour }
	d, dTerms, _ := newRoles(t, path, roleAuto, cpu, far)
	runRoles(t, d)
	if td := nextTerm(t, dTerms); td.epoch != 3 {
		t.Fatalf("d's epoch %d", td.epoch)
	}
	act.Millicores = 300
	r := tb.exec.Apply(context.Background(), []executor.Action{act})
	if r[0].Outcome != executor.Stale || cpu.q != 50000 {
		t.Fatalf("superseded write: %+v quota %d", r, cpu.q)
	}
	deadline := time.Now().Add(3 * time.Second)
	stepDowns := func() uint64 {
		b.state.mu.Lock()
		defer b.state.mu.Unlock()
		return b.state.stepDowns
	}
	for stepDowns() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("b did not step down")
		}
		time.Sleep(10 * time.Millisecond)
	}
	b.state.mu.Lock()
	role := b.state.role
	b.state.mu.Unlock()
	if role != "standby" {
		t.Fatalf("b is %q after stepping down", role)
	}
}
