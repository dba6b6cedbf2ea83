// Package kubelease owns leadership through a coordination.k8s.io/v1
// Lease, by client-go's leader election: the lease.Lease used when ARS
// runs in Kubernetes (arsd --lease-backend kubernetes). The epoch is the
// Lease's leaseTransitions + 1: the API server keeps it durably and it
// grows on every change of holder. Before each write the holder re-reads
// the Lease (Check) and refuses to act unless it still names this agent at
// this epoch.
package kubelease

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	coordinationv1client "k8s.io/client-go/kubernetes/typed/coordination/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"

	"github.com/ars-dev/ars/agent/lease"
)

// Config names the Lease and tunes the election.
type Config struct {
	Namespace, Name string
	// Identity must be unique per agent process (default pod/pid).
	Identity string
	// LeaseDuration, RenewDeadline, RetryPeriod: client-go's (defaults
	// 4 s, 3 s, 500 ms: a failover within ~4.5 s).
	LeaseDuration, RenewDeadline, RetryPeriod time.Duration
	Log                                       *slog.Logger
}

// Kube is the Kubernetes lease.
type Kube struct {
	cfg    Config
	client coordinationv1client.CoordinationV1Interface

	mu      sync.Mutex
	epoch   uint64 // ours while leading
	leading bool
	seenN   uint64
	seenBy  string
	cancel  context.CancelFunc
	runDone chan struct{}
	started chan struct{}
	// keepOnCancel (tests): stopping does not release the Lease, as
	// when the process is frozen or cut off.
	keepOnCancel bool
}

// New returns a lease on the Lease named in cfg through client (a
// clientset's CoordinationV1(); only Leases are used).
func New(client coordinationv1client.CoordinationV1Interface, cfg Config) (*Kube, error) {
	if cfg.Namespace == "" || cfg.Name == "" || cfg.Identity == "" {
		return nil, fmt.Errorf("kubelease: namespace, name and identity are required")
	}
	if cfg.LeaseDuration == 0 {
		cfg.LeaseDuration, cfg.RenewDeadline, cfg.RetryPeriod = 4*time.Second, 3*time.Second, 500*time.Millisecond
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	return &Kube{cfg: cfg, client: client}, nil
}

// InCluster builds a Kube from the pod's service account.
func InCluster(cfg Config) (*Kube, error) {
	rc, err := rest.InClusterConfig()
	if err != nil {
		return nil, fmt.Errorf("kubelease: %w", err)
	}
	cs, err := coordinationv1client.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("kubelease: %w", err)
	}
	return New(cs, cfg)
}

func epochOf(l *coordinationv1.Lease) (uint64, string) {
	var n uint64 = 1
	if l.Spec.LeaseTransitions != nil {
		n = uint64(*l.Spec.LeaseTransitions) + 1
	}
	holder := ""
	if l.Spec.HolderIdentity != nil {
		holder = *l.Spec.HolderIdentity
	}
	return n, holder
}

// Acquire runs the election until this agent leads and returns its epoch.
func (k *Kube) Acquire(ctx context.Context) (uint64, error) {
	k.mu.Lock()
	if k.leading {
		defer k.mu.Unlock()
		return k.epoch, nil
	}
	runCtx, cancel := context.WithCancel(context.Background())
	started := make(chan struct{})
	done := make(chan struct{})
	k.cancel, k.started, k.runDone = cancel, started, done
	k.mu.Unlock()

	le, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
		Lock: &resourcelock.LeaseLock{
			LeaseMeta:  metav1.ObjectMeta{Namespace: k.cfg.Namespace, Name: k.cfg.Name},
			Client:     k.client,
			LockConfig: resourcelock.ResourceLockConfig{Identity: k.cfg.Identity},
		},
		LeaseDuration:   k.cfg.LeaseDuration,
		RenewDeadline:   k.cfg.RenewDeadline,
		RetryPeriod:     k.cfg.RetryPeriod,
		ReleaseOnCancel: !k.keepOnCancel,
		Name:            "ars",
		Callbacks: leaderelection.LeaderCallbacks{
			OnStartedLeading: func(context.Context) { close(started) },
			OnStoppedLeading: func() {
				k.mu.Lock()
				k.leading = false
				k.mu.Unlock()
			},
			OnNewLeader: func(id string) { k.cfg.Log.Info("kubernetes lease holder", "holder", id) },
		},
	})
	if err != nil {
		cancel()
		return 0, fmt.Errorf("kubelease: %w", err)
	}
	go func() { defer close(done); le.Run(runCtx) }()
	select {
	case <-ctx.Done():
		cancel()
		<-done
		return 0, ctx.Err()
	case <-done:
		return 0, fmt.Errorf("kubelease: election ended without leading")
	case <-started:
	}
	l, err := k.client.Leases(k.cfg.Namespace).Get(ctx, k.cfg.Name, metav1.GetOptions{})
	if err != nil {
		cancel()
		<-done
		return 0, fmt.Errorf("kubelease: read lease: %w", err)
	}
	n, holder := epochOf(l)
	k.mu.Lock()
	defer k.mu.Unlock()
	k.epoch, k.leading, k.seenN, k.seenBy = n, true, n, holder
	return n, nil
}

// Check re-reads the Lease: it must still name this agent at its epoch.
func (k *Kube) Check(ctx context.Context) error {
	k.mu.Lock()
	mine, leading := k.epoch, k.leading
	k.mu.Unlock()
	l, err := k.client.Leases(k.cfg.Namespace).Get(ctx, k.cfg.Name, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("kubelease: read lease: %w", err)
	}
	n, holder := epochOf(l)
	k.mu.Lock()
	k.seenN, k.seenBy = n, holder
	k.mu.Unlock()
	if !leading || holder != k.cfg.Identity || n != mine {
		if n <= mine {
			n = mine + 1 // our term is over even if nobody took it yet
		}
		return &lease.LostError{Mine: mine, Current: n, Holder: holder}
	}
	return nil
}

// Release stops the election, releasing the Lease if held.
func (k *Kube) Release() error {
	k.mu.Lock()
	cancel, done := k.cancel, k.runDone
	k.cancel, k.leading = nil, false
	k.mu.Unlock()
	if cancel != nil {
		cancel()
		<-done
	}
	return nil
}

// Current returns the epoch and holder last seen.
func (k *Kube) Current() (uint64, string) {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.seenN, k.seenBy
}

// TryAcquire waits at most one lease duration to lead; (0, nil) when
// another agent leads.
func (k *Kube) TryAcquire() (uint64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), k.cfg.LeaseDuration+k.cfg.RetryPeriod)
	defer cancel()
	n, err := k.Acquire(ctx)
	if errors.Is(err, context.DeadlineExceeded) {
		return 0, nil
	}
	return n, err
}

// TTL is the lease duration.
func (k *Kube) TTL() time.Duration { return k.cfg.LeaseDuration }

// Holder is this agent's identity.
func (k *Kube) Holder() string { return k.cfg.Identity }

// Renew confirms the lease every retry period (client-go renews it) and
// returns when it is lost or ctx ends.
func (k *Kube) Renew(ctx context.Context) error {
	t := time.NewTicker(k.cfg.RetryPeriod)
	defer t.Stop()
	for {
		if err := k.Check(ctx); errors.Is(err, lease.ErrLost) {
			return err
		} else if err != nil && ctx.Err() == nil {
			k.cfg.Log.Warn("kubernetes lease check", "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}
