package kubelease

import (
	"context"
	"errors"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/ars-dev/ars/agent/lease"
)

// There is no API server here: these tests run client-go's leader
// election against the fake clientset, which stores the Lease object.

func newKube(t *testing.T, cs *fake.Clientset, id string) *Kube {
	t.Helper()
	k, err := New(cs.CoordinationV1(), Config{Namespace: "ars-system", Name: "ars-node1", Identity: id,
		LeaseDuration: time.Second, RenewDeadline: 600 * time.Millisecond, RetryPeriod: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { k.Release() })
	return k
}

func TestKubeLeaseFailoverAndFencing(t *testing.T) {
	cs := fake.NewClientset()
	a, b := newKube(t, cs, "node1/arsd-a"), newKube(t, cs, "node1/arsd-b")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	n, err := a.Acquire(ctx)
	if err != nil || n != 1 {
		t.Fatalf("a: epoch %d, %v", n, err)
	}
	if err := a.Check(ctx); err != nil {
		t.Fatalf("a.Check while leading: %v", err)
	}
	// b waits while a leads.
	short, cancelShort := context.WithTimeout(ctx, 1500*time.Millisecond)
	if _, err := b.Acquire(short); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("b acquired a held lease: %v", err)
	}
	cancelShort()

	// a stops cleanly (releases): b leads at the next epoch.
	got := make(chan uint64, 1)
	go func() {
		n, err := b.Acquire(ctx)
		if err != nil {
			t.Error(err)
		}
		got <- n
	}()
	time.Sleep(200 * time.Millisecond)
	start := time.Now()
	a.Release()
	select {
	case n := <-got:
		t.Logf("b leads at epoch %d, %v after a released", n, time.Since(start))
		if n != 2 {
			t.Fatalf("b's epoch %d, want 2", n)
		}
	case <-ctx.Done():
		t.Fatal("b never led")
	}
	// a, superseded, is fenced: its Check names the newer epoch.
	err = a.Check(ctx)
	var lost *lease.LostError
	if !errors.As(err, &lost) || lost.Current != 2 || lost.Holder != "node1/arsd-b" {
		t.Fatalf("a.Check after takeover: %v", err)
	}
	l, err := cs.CoordinationV1().Leases("ars-system").Get(ctx, "ars-node1", metav1.GetOptions{})
	if err != nil || *l.Spec.HolderIdentity != "node1/arsd-b" {
		t.Fatalf("lease object %+v %v", l, err)
	}
}

// A holder that stops renewing (hung, or partitioned from the API
// server) loses the Lease after its duration; the other agent takes over.
func TestKubeLeaseExpiry(t *testing.T) {
	cs := fake.NewClientset()
	a, b := newKube(t, cs, "a"), newKube(t, cs, "b")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	a.keepOnCancel = true
	if _, err := a.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	// a freezes: it stops renewing and never releases.
	a.mu.Lock()
	cancelA, doneA := a.cancel, a.runDone
	a.mu.Unlock()
	cancelA()
	<-doneA
	start := time.Now()
	n, err := b.Acquire(ctx)
	if err != nil || n != 2 {
		t.Fatalf("b after expiry: %d %v", n, err)
	}
	t.Logf("b took the expired lease at epoch %d after %v", n, time.Since(start))
	if err := a.Check(ctx); !errors.Is(err, lease.ErrLost) {
		t.Fatalf("a not fenced: %v", err)
	}
}
