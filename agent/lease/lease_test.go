package lease

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

type clock struct{ ns atomic.Int64 }

func (c *clock) now() time.Duration      { return time.Duration(c.ns.Load()) }
func (c *clock) advance(d time.Duration) { c.ns.Add(int64(d)) }
func newLocal(t *testing.T, dir, holder string, c *clock) *Local {
	t.Helper()
	l, err := NewLocal(LocalConfig{Path: filepath.Join(dir, "lease"), EpochFile: filepath.Join(dir, holder+".epoch"),
		Holder: holder, TTL: time.Second, Now: c.now})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Release() })
	return l
}

func TestTakeoverByDeathAndByExpiry(t *testing.T) {
	dir := t.TempDir()
	c := &clock{}
	c.ns.Store(int64(time.Hour))
	a, b, d := newLocal(t, dir, "a", c), newLocal(t, dir, "b", c), newLocal(t, dir, "d", c)
	if n, err := a.TryAcquire(); n != 1 || err != nil {
		t.Fatalf("a: %d %v", n, err)
	}
	if n, err := b.TryAcquire(); n != 0 || err != nil {
		t.Fatalf("b took a live lease: %d %v", n, err)
	}
	if e, h := b.Current(); e != 1 || h != "a" {
		t.Fatalf("b sees %d %q", e, h)
	}
	if err := a.Check(context.Background()); err != nil {
		t.Fatal(err)
	}
	// a is stopped: alive (its claim stays locked) but not renewing.
	c.advance(900 * time.Millisecond)
	if n, _ := b.TryAcquire(); n != 0 {
		t.Fatal("b took the lease before the TTL")
	}
	c.advance(200 * time.Millisecond)
	if n, err := b.TryAcquire(); n != 2 || err != nil {
		t.Fatalf("b after the TTL: %d %v", n, err)
	}
	// a wakes up: superseded.
	err := a.Check(context.Background())
	var lost *LostError
	if !errors.As(err, &lost) || !errors.Is(err, ErrLost) || lost.Mine != 1 || lost.Current != 2 || lost.Holder != "b" {
		t.Fatalf("a.Check after takeover: %v", err)
	}
	// b dies (its claim is unlocked): d takes over at once, no TTL wait.
	b.Release()
	if n, err := d.TryAcquire(); n != 3 || err != nil {
		t.Fatalf("d after b's death: %d %v", n, err)
	}
	rec, err := readLeaseFile(filepath.Join(dir, "lease"))
	if err != nil || rec.Epoch != 3 || rec.Holder != "d" {
		t.Fatalf("lease file %+v %v", rec, err)
	}
	if _, err := os.Stat(filepath.Join(dir, "lease.1")); !os.IsNotExist(err) {
		t.Fatalf("claim 1 not cleaned up: %v", err)
	}
}

func TestStoppedHolderNotSupersededKeepsLease(t *testing.T) {
	dir := t.TempDir()
	c := &clock{}
	a := newLocal(t, dir, "a", c)
	a.TryAcquire()
	c.advance(10 * time.Second) // stopped long, nobody else around
	if err := a.Check(context.Background()); err != nil {
		t.Fatalf("an unsuperseded holder lost its lease: %v", err)
	}
	b := newLocal(t, dir, "b", c)
	if n, _ := b.TryAcquire(); n != 0 {
		t.Fatal("the renewal at Check was not seen")
	}
}

func TestEpochSurvivesEmptiedLeaseDir(t *testing.T) {
	state, run := t.TempDir(), t.TempDir()
	c := &clock{}
	mk := func() *Local {
		l, err := NewLocal(LocalConfig{Path: filepath.Join(run, "lease"), EpochFile: filepath.Join(state, "epoch"), Holder: "a", TTL: time.Second, Now: c.now})
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	for want := uint64(1); want <= 3; want++ {
		l := mk()
		if n, err := l.TryAcquire(); n != want || err != nil {
			t.Fatalf("acquire %d: %v", n, err)
		}
		l.Release()
	}
	// Reboot: /run is emptied, the state directory is not.
	os.RemoveAll(run)
	os.MkdirAll(run, 0o700)
	l := mk()
	defer l.Release()
	if n, _ := l.TryAcquire(); n != 4 {
		t.Fatalf("epoch after reboot %d, want 4", n)
	}
}

func TestOneWinnerAmongContenders(t *testing.T) {
	dir := t.TempDir()
	c := &clock{}
	var wins atomic.Int32
	var wg sync.WaitGroup
	for i := 0; i < 16; i++ {
		l := newLocal(t, dir, "c"+string(rune('a'+i)), c)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if n, err := l.TryAcquire(); err != nil {
				t.Error(err)
			} else if n > 0 {
				wins.Add(1)
			}
		}()
	}
	wg.Wait()
	if wins.Load() != 1 {
		t.Fatalf("%d winners", wins.Load())
	}
}

func TestCorruptRenewalJudgedByClaimAge(t *testing.T) {
	dir := t.TempDir()
	c := &clock{}
	a, b := newLocal(t, dir, "a", c), newLocal(t, dir, "b", c)
	a.TryAcquire()
	os.WriteFile(filepath.Join(dir, "lease.1.renew"), []byte("garbage"), 0o600)
	if n, _ := b.TryAcquire(); n != 0 {
		t.Fatal("a fresh claim with a corrupt renewal was taken")
	}
	old := time.Now().Add(-time.Minute)
	os.Chtimes(filepath.Join(dir, "lease.1"), old, old)
	if n, _ := b.TryAcquire(); n != 2 {
		t.Fatalf("an old claim with a corrupt renewal was not taken: %d", n)
	}
}

func TestAcquireWaitsAndHonoursContext(t *testing.T) {
	dir := t.TempDir()
	c := &clock{}
	a, b := newLocal(t, dir, "a", c), newLocal(t, dir, "b", c)
	a.TryAcquire()
	ctx, cancel := context.WithTimeout(context.Background(), 150*time.Millisecond)
	defer cancel()
	if _, err := b.Acquire(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("acquire of a held lease: %v", err)
	}
	go func() { time.Sleep(100 * time.Millisecond); a.Release() }()
	start := time.Now()
	n, err := b.Acquire(context.Background())
	if err != nil || n != 2 {
		t.Fatalf("%d %v", n, err)
	}
	t.Logf("takeover %v after release", time.Since(start)-100*time.Millisecond)
}
