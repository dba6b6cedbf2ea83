package main

// Roles: arsd runs as the active agent (the one writer) or as a standby,
// decided by a lease (agent/lease). This file wires the lease, the fenced
// executor, the journal recovery on takeover and the role metrics.

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	bolt "go.etcd.io/bbolt"

	"github.com/ars-dev/ars/agent/executor"
	"github.com/ars-dev/ars/agent/lease"
	"github.com/ars-dev/ars/agent/replica"
	"github.com/ars-dev/ars/agent/telemetry"
	"github.com/ars-dev/ars/mapper"
)

// Role values of --role.
const (
	roleAuto    = "auto"    // take the lease if free, else follow until it frees
	roleActive  = "active"  // take the lease at start or exit with an error
	roleStandby = "standby" // follow first; take the lease only when it frees later
)

// leader is a lease the roles can run on: agent/lease's Local or
// agent/lease/kubelease's Kube.
type leader interface {
	lease.Lease
	TryAcquire() (uint64, error)
	TTL() time.Duration
	Holder() string
	Renew(ctx context.Context) error
}

// roleFlags are the command-line switches for leadership.
type roleFlags struct {
	backend   *string
	kubeNS    *string
	kubeName  *string
	role      *string
	leaseFile *string
	leaseTTL  *time.Duration
	replSock  *string
	bpfPin    *string
}

func registerRoleFlags() roleFlags {
	return roleFlags{
		backend:   flag.String("lease-backend", "local", "local (a lease file, no outside service) or kubernetes (a coordination.k8s.io Lease, in-cluster credentials)"),
		kubeNS:    flag.String("kube-lease-namespace", "ars-system", "namespace of the Kubernetes Lease"),
		kubeName:  flag.String("kube-lease-name", "", "name of the Kubernetes Lease (default ars-<node>, node from $NODE_NAME or the host name)"),
		role:      flag.String("role", roleAuto, "auto|active|standby: auto takes the lease if free and otherwise follows as a standby"),
		leaseFile: flag.String("lease-file", "", "local lease file shared by the agents of this host (default: lease beside the control socket, /run/ars/lease)"),
		leaseTTL:  flag.Duration("lease-ttl", 2*time.Second, "how long a stopped (not dead) active keeps the lease without renewing it"),
		replSock:  flag.String("replication-socket", "", "socket the active publishes its state on for standbys (default: <lease-file>.repl.sock, \"off\" to disable)"),
		bpfPin:    flag.String("bpf-pin-dir", "/sys/fs/bpf/ars", "bpffs directory where eBPF maps and links are pinned so telemetry survives restarts (\"off\" to disable)"),
	}
}

func (f roleFlags) leasePath(controlSocket string) string {
	if *f.leaseFile != "" {
		return *f.leaseFile
	}
	return filepath.Join(filepath.Dir(controlSocket), "lease")
}

func (f roleFlags) replPath(leasePath string) string {
	switch *f.replSock {
	case "off":
		return ""
	case "":
		return leasePath + ".repl.sock"
	}
	return *f.replSock
}

func (f roleFlags) validate() error {
	switch *f.role {
	case roleAuto, roleActive, roleStandby:
	default:
		return fmt.Errorf("--role %q: want auto, active or standby", *f.role)
	}
	if *f.backend != "local" && *f.backend != "kubernetes" {
		return fmt.Errorf("--lease-backend %q: want local or kubernetes", *f.backend)
	}
	if *f.leaseTTL < 200*time.Millisecond || *f.leaseTTL > time.Minute {
		return fmt.Errorf("--lease-ttl %v: want [200ms, 1m]", *f.leaseTTL)
	}
	return nil
}

// recoverJournal closes the intents a previous agent left pending (it
// crashed or was killed between journaling an intent and recording its
// outcome), each with an audit record (result "reconciled"). Nothing is
// replayed: the loop re-reads the host before any decision and the
// executor writes only values that differ, so an action that did reach
// the host is not made twice and one that did not is decided again.
func recoverJournal(j *mapper.Journal, log *slog.Logger, now func() time.Time, audit func(executor.Record) error) (int, error) {
	pending, err := j.Pending()
	if err != nil {
		return 0, fmt.Errorf("journal recovery: %w", err)
	}
	if len(pending) == 0 {
		return 0, nil
	}
	var cs []mapper.Completion
	for _, p := range pending {
		log.Warn("action in flight when the previous agent stopped", "seq", p.Seq, "vm", p.VM, "kind", p.Kind,
			"target", p.Target, "value", p.Value, "epoch", p.Epoch)
		cs = append(cs, mapper.Completion{Seq: p.Seq, Outcome: "reconciled", At: now().UTC(),
			Detail: "agent restarted; the host's state is re-read before any new decision"})
		if audit != nil {
			if err := audit(executor.Record{Time: now().UTC(), Actor: "arsd", VM: p.VM, Kind: p.Kind, Target: p.Target,
				After: p.Value, Reason: fmt.Sprintf("journal intent %d in flight when the previous agent stopped; the host is re-read", p.Seq),
				Epoch: p.Epoch, Result: "reconciled"}); err != nil {
				return 0, fmt.Errorf("journal recovery: audit: %w", err)
			}
		}
	}
	if err := j.Outcomes(cs); err != nil {
		return 0, fmt.Errorf("journal recovery: %w", err)
	}
	return len(pending), nil
}

// leaseFence adapts a lease to the executor's per-write fence.
func leaseFence(l lease.Lease) executor.Fence {
	return func(ctx context.Context) (uint64, error) {
		err := l.Check(ctx)
		var lost *lease.LostError
		if errors.As(err, &lost) {
			return lost.Current, err
		}
		return 0, err
	}
}

// fencedExec is the loop's executor while this agent is active: before
// every plan it confirms the lease. A superseded agent raises its
// executor's epoch to the newer one, so the plan is refused as stale and
// each refusal audited, and then steps down.
type fencedExec struct {
	inner *executor.Executor
	lease lease.Lease
	lost  func(error)
	log   *slog.Logger
}

func (f *fencedExec) Apply(ctx context.Context, actions []executor.Action) []executor.Result {
	err := f.lease.Check(ctx)
	if err == nil {
		return f.inner.Apply(ctx, actions)
	}
	var lost *lease.LostError
	if errors.As(err, &lost) {
		f.inner.SetEpoch(lost.Current)
		res := f.inner.Apply(ctx, actions) // refused: stale epoch, audited
		f.log.Error("lease lost: writes refused, stepping down", "epoch", lost.Mine, "new_epoch", lost.Current,
			"new_holder", lost.Holder, "refused", len(actions))
		f.lost(err)
		return res
	}
	// The lease cannot be read: leadership is unconfirmed, write nothing.
	res := make([]executor.Result, len(actions))
	for i, a := range actions {
		res[i] = executor.Result{Action: a, Outcome: executor.Failed, Err: fmt.Errorf("leadership not confirmed: %w", err)}
	}
	return res
}

// roleState is what the role metrics report.
type roleState struct {
	mu        sync.Mutex
	role      string
	epoch     uint64
	takeovers uint64
	stepDowns uint64
	// follower, when set, adds the standby's ars_replica_* metrics.
	follower *replica.Follower
}

func (r *roleState) set(f func(r *roleState)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	f(r)
}

// descs are the role metrics: ars_role{role}, ars_lease_epoch,
// ars_takeovers_total, ars_stepdowns_total.
func (r *roleState) descs() [4]*prometheus.Desc {
	return [4]*prometheus.Desc{
		prometheus.NewDesc("ars_role", "1 for this agent's role (active or standby).", []string{"role"}, nil),
		prometheus.NewDesc("ars_lease_epoch", "The leader epoch (fencing token) this agent last held or saw.", nil, nil),
		prometheus.NewDesc("ars_takeovers_total", "Times this agent took the lease.", nil, nil),
		prometheus.NewDesc("ars_stepdowns_total", "Times this agent lost the lease to a newer epoch and stepped down.", nil, nil),
	}
}

func (r *roleState) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range r.descs() {
		ch <- d
	}
	if r.follower != nil {
		r.follower.Describe(ch)
	}
}

func (r *roleState) Collect(ch chan<- prometheus.Metric) {
	d := r.descs()
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, name := range []string{"active", "standby"} {
		v := 0.0
		if r.role == name {
			v = 1
		}
		ch <- prometheus.MustNewConstMetric(d[0], prometheus.GaugeValue, v, name)
	}
	ch <- prometheus.MustNewConstMetric(d[1], prometheus.GaugeValue, float64(r.epoch))
	ch <- prometheus.MustNewConstMetric(d[2], prometheus.CounterValue, float64(r.takeovers))
	ch <- prometheus.MustNewConstMetric(d[3], prometheus.CounterValue, float64(r.stepDowns))
	if r.follower != nil {
		r.follower.Collect(ch)
	}
}

// roles runs the agent's terms: wait for the lease (standby, following
// the active), then act under the new epoch until the lease is lost (step
// down, back to standby) or ctx ends (release the lease so a standby takes
// over at once).
type roles struct {
	role  string
	lease leader
	exec  *executor.Executor
	state *roleState
	log   *slog.Logger
	// follower keeps the hot copy while standby (nil: no replication);
	// publish serves the stream while active.
	follower *replica.Follower
	publish  *replica.Publisher
	// act runs one term as active with the epoch; it returns when ctx
	// ends. lost steps the agent down (the fenced executor calls it).
	act func(ctx context.Context, epoch uint64, lost func(error)) error
	// stepDown runs after a term (closes QMP connections for the next active).
	stepDown func()
}

func (r *roles) acquire(ctx context.Context, first bool) (uint64, error) {
	if first && r.role == roleActive {
		n, err := r.lease.TryAcquire()
		if err != nil {
			return 0, err
		}
		if n == 0 {
			e, h := r.lease.Current()
			return 0, fmt.Errorf("--role active: %w (epoch %d, holder %s)", lease.ErrHeld, e, h)
		}
		return n, nil
	}
	if first && r.role == roleStandby {
		// Give a starting active one TTL to claim a free lease first.
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(r.lease.TTL()):
		}
	}
	fctx, stop := context.WithCancel(ctx)
	defer stop()
	if r.follower != nil {
		go r.follower.Run(fctx)
	}
	return r.lease.Acquire(ctx)
}

func (r *roles) run(ctx context.Context) error {
	for first := true; ; first = false {
		e, h := r.lease.Current()
		r.state.set(func(s *roleState) { s.role, s.epoch = "standby", e })
		if !first || r.role != roleActive {
			r.log.Info("standby: following the active until the lease frees", "lease", r.lease.Holder(), "epoch", e, "holder", h)
		}
		epoch, err := r.acquire(ctx, first)
		if ctx.Err() != nil {
			return nil
		}
		if err != nil {
			return err
		}
		r.exec.SetEpoch(epoch)
		r.state.set(func(s *roleState) { s.role, s.epoch = "active", epoch; s.takeovers++ })
		r.log.Info("active: lease acquired", "epoch", epoch, "holder", r.lease.Holder())
		if r.follower != nil {
			h := r.follower.Hot()
			r.log.Info("hot copy at takeover (reconciled against the host on the first tick)", "frames", h.Frames,
				"from_epoch", h.Epoch, "drm_generation", h.DRM.Generation, "vms", len(h.DRM.VMs),
				"audit_head_seq", h.AuditHead.Seq, "lag", h.Lag.Round(time.Millisecond))
		}

		term, cancel := context.WithCancel(ctx)
		published := make(chan struct{})
		if r.publish == nil {
			close(published)
		} else {
			go func() {
				defer close(published) // its socket is gone before the next term
				if err := r.publish.Serve(term); err != nil {
					r.log.Warn("replication stream not served", "err", err)
				}
			}()
		}
		var lostOnce sync.Once
		lostErr := make(chan error, 1)
		lost := func(err error) {
			lostOnce.Do(func() { lostErr <- err; cancel() })
		}
		go func() {
			err := r.lease.Renew(term)
			var le *lease.LostError
			if errors.As(err, &le) {
				// Refuse every later write at once; the loop's next plan
				// (audited as stale) steps it down, or a timeout does.
				r.exec.SetEpoch(le.Current)
				select {
				case <-term.Done():
				case <-time.After(3 * time.Second):
					r.log.Error("lease lost and no plan since: stepping down", "err", err)
					lost(err)
				}
			}
		}()
		err = r.act(term, epoch, lost)
		cancel()
		<-published
		if r.stepDown != nil {
			r.stepDown()
		}
		select {
		case lerr := <-lostErr:
			r.lease.Release()
			r.state.set(func(s *roleState) { s.stepDowns++ })
			r.log.Warn("stepped down", "err", lerr)
			continue
		default:
		}
		if rerr := r.lease.Release(); rerr != nil {
			r.log.Warn("lease release", "err", rerr)
		}
		if err != nil {
			return err
		}
		return nil
	}
}

// preparePinDir returns the bpffs directory for pinned telemetry ("" when
// off), mounted and created by the engine, which is root. A directory that cannot be prepared is reported and telemetry is not
// pinned (it still runs).
func (f roleFlags) preparePinDir(log *slog.Logger) string {
	dir := *f.bpfPin
	if dir == "off" || dir == "" {
		return ""
	}
	if err := telemetry.EnsureBPFFS(dir); err != nil {
		log.Warn("eBPF maps not pinned: telemetry will restart from zero with the agent", "dir", dir, "err", err)
		return ""
	}
	// The split collector loads and pins as root before it drops to
	// nobody, so the directory stays root's (handing it to nobody would
	// let any nobody process replace pinned maps).
	return dir
}

// openJournal opens the intent journal. A journal that cannot be opened
// (truncated, corrupted) is moved aside, never deleted, and a new one is
// started: pending intents only ever say "re-read the host", which the
// loop does anyway; movedTo names where. A journal locked by another
// agent (shared state directory) is an error.
func openJournal(path string, log *slog.Logger, now func() time.Time) (j *mapper.Journal, movedTo string, err error) {
	j, err = mapper.OpenJournal(path)
	if err == nil {
		_, err = j.Pending()
		if err == nil {
			return j, "", nil
		}
		j.Close()
	}
	if errors.Is(err, bolt.ErrTimeout) {
		return nil, "", fmt.Errorf("%w (another arsd uses this state directory? each agent needs its own)", err)
	}
	if _, serr := os.Lstat(path); serr != nil {
		return nil, "", err // nothing to move aside: not a corruption
	}
	aside := fmt.Sprintf("%s.corrupt-%s", path, now().UTC().Format("20060102T150405.000000000Z"))
	if rerr := os.Rename(path, aside); rerr != nil {
		return nil, "", errors.Join(err, rerr)
	}
	log.Error("journal unreadable: moved aside, new journal started; the host's state is re-read", "err", err, "moved_to", aside)
	j, err = mapper.OpenJournal(path)
	return j, aside, err
}

// newLeader builds the lease of --lease-backend.
func (f roleFlags) newLeader(controlSocket, stateDir string, log *slog.Logger) (leader, error) {
	if *f.backend == "kubernetes" {
		return f.kubeLeader(log)
	}
	return lease.NewLocal(lease.LocalConfig{Path: f.leasePath(controlSocket), EpochFile: filepath.Join(stateDir, "epoch"),
		TTL: *f.leaseTTL, Log: log})
}
