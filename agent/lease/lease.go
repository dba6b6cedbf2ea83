// Package lease owns leadership among the ARS agents of one host: which
// agent is active (the only one that may write to the host) and the epoch
// (fencing token) it writes under. Two implementations share the Lease
// interface: Local, files under /run/ars with no outside service (the
// default), and Kube, a coordination.k8s.io Lease through client-go's
// leader election.
//
// Local lease layout, for a lease path P (default /run/ars/lease):
//
//	P.<N>        claim of epoch N: created exclusively (link(2)), holding
//	             the holder's identity, and flock(2)ed by the holder for
//	             as long as it lives — the kernel drops the lock the moment
//	             the holder dies, so a kill -9 is seen at once;
//	P.<N>.renew  the holder's last renewal (CLOCK_BOOTTIME) and TTL; a
//	             holder that is alive but stopped (SIGSTOP, a long GC, a
//	             hung disk) keeps its lock but stops renewing, and its
//	             claim expires after the TTL;
//	P            the current holder and epoch, for operators (checksummed).
//
// The epoch is the highest claim; taking over creates claim N+1, which
// only one contender can do. The epoch is also written to a file in the
// agent's state directory (a floor that survives a reboot, when /run is
// emptied). No lock is ever held across a wait, so a stopped agent can
// delay nobody.
package lease

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ars-dev/ars/internal/atomicfile"
)

// ErrLost says another agent holds a newer epoch: this one must not write.
var ErrLost = errors.New("lease: lost to a newer epoch")

// ErrHeld says the lease is held by a live agent (role "active" at start).
var ErrHeld = errors.New("lease: held by another live agent")

// LostError carries the epoch that superseded ours.
type LostError struct {
	Mine, Current uint64
	Holder        string
}

func (e *LostError) Error() string {
	return fmt.Sprintf("lease: epoch %d superseded by epoch %d (holder %s)", e.Mine, e.Current, e.Holder)
}

// Unwrap makes errors.Is(err, ErrLost) hold.
func (e *LostError) Unwrap() error { return ErrLost }

// Lease is leadership. Acquire blocks (as a standby) until this agent
// holds the lease and returns its epoch; Check confirms, before a write,
// that it still does; Release gives it up at a clean stop.
type Lease interface {
	Acquire(ctx context.Context) (epoch uint64, err error)
	Check(ctx context.Context) error
	Release() error
	// Current returns the epoch and holder in force, as last seen.
	Current() (epoch uint64, holder string)
}

// Record is what a claim and the lease file say.
type Record struct {
	Holder   string    `json:"holder"`
	PID      int       `json:"pid"`
	Epoch    uint64    `json:"epoch"`
	Acquired time.Time `json:"acquired"`
}

type renewal struct {
	RenewedNs int64 `json:"renewed_ns"` // CLOCK_BOOTTIME
	TTLNs     int64 `json:"ttl_ns"`
}

// LocalConfig configures a Local lease.
type LocalConfig struct {
	// Path is the lease file (its directory holds the claims).
	Path string
	// EpochFile, when set, keeps the last epoch durably (state dir).
	EpochFile string
	// Holder names this agent (default host/arsd[pid]).
	Holder string
	// TTL is how long a claim lives without renewal (default 2 s).
	TTL time.Duration
	// Poll is how often a standby looks at the lease (default 50 ms).
	Poll time.Duration
	Log  *slog.Logger
	// Now returns CLOCK_BOOTTIME (tests).
	Now func() time.Duration
}

// Local is the file lease.
type Local struct {
	cfg LocalConfig

	mu     sync.Mutex
	claim  *os.File // our locked claim, nil when not holding
	epoch  uint64   // our epoch while holding
	seenN  uint64
	seenBy string
	renew  time.Duration // our last renewal
}

// Boottime reads CLOCK_BOOTTIME, one clock for every process on the host
// that does not jump with the wall clock.
func Boottime() time.Duration {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		return time.Duration(time.Now().UnixNano())
	}
	return time.Duration(ts.Nano())
}

// NewLocal checks cfg and creates the lease directory (0700).
func NewLocal(cfg LocalConfig) (*Local, error) {
	if cfg.Path == "" || !filepath.IsAbs(cfg.Path) {
		return nil, fmt.Errorf("lease: path %q must be absolute", cfg.Path)
	}
	if cfg.TTL <= 0 {
		cfg.TTL = 2 * time.Second
	}
	if cfg.Poll <= 0 {
		cfg.Poll = 50 * time.Millisecond
	}
	if cfg.Now == nil {
		cfg.Now = Boottime
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Holder == "" {
		h, _ := os.Hostname()
		cfg.Holder = fmt.Sprintf("%s/arsd[%d]", h, os.Getpid())
	}
	if err := os.MkdirAll(filepath.Dir(cfg.Path), 0o700); err != nil {
		return nil, fmt.Errorf("lease: %w", err)
	}
	return &Local{cfg: cfg}, nil
}

// TTL is the lease's time to live.
func (l *Local) TTL() time.Duration { return l.cfg.TTL }

// Holder is this agent's identity.
func (l *Local) Holder() string { return l.cfg.Holder }

func leaseFormat() atomicfile.Format       { return atomicfile.Format{Kind: "lease", Version: 1} }
func renewFormat() atomicfile.Format       { return atomicfile.Format{Kind: "lease.renew", Version: 1} }
func epochFormat() atomicfile.Format       { return atomicfile.Format{Kind: "epoch", Version: 1} }
func (l *Local) claimPath(n uint64) string { return l.cfg.Path + "." + strconv.FormatUint(n, 10) }

// claims lists the epochs claimed, highest first.
func (l *Local) claims() ([]uint64, error) {
	dir, base := filepath.Split(l.cfg.Path)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("lease: %w", err)
	}
	var ns []uint64
	for _, e := range ents {
		rest, ok := strings.CutPrefix(e.Name(), base+".")
		if !ok {
			continue
		}
		if n, err := strconv.ParseUint(rest, 10, 64); err == nil && n > 0 {
			ns = append(ns, n)
		}
	}
	sort.Slice(ns, func(i, j int) bool { return ns[i] > ns[j] })
	return ns, nil
}

func (l *Local) highest() (uint64, error) {
	ns, err := l.claims()
	if err != nil || len(ns) == 0 {
		return 0, err
	}
	return ns[0], nil
}

func readRecord(path string) (Record, error) {
	var r Record
	b, err := atomicfile.ReadFile(path, 4096)
	if err != nil {
		return r, err
	}
	if err := json.Unmarshal(b, &r); err != nil {
		return r, fmt.Errorf("lease: %s: %w", path, err)
	}
	return r, nil
}

// state describes claim n: whether its holder is alive and unexpired.
func (l *Local) state(n uint64) (alive bool, holder string, why string) {
	p := l.claimPath(n)
	fd, err := unix.Open(p, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return false, "", "claim unreadable: " + err.Error()
	}
	f := os.NewFile(uintptr(fd), p)
	defer f.Close()
	rec, _ := readRecord(p)
	holder = rec.Holder
	if err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB); err == nil {
		unix.Flock(fd, unix.LOCK_UN)
		return false, holder, "holder gone (claim unlocked)"
	}
	b, _, err := renewFormat().Load(p + ".renew")
	var rn renewal
	if err == nil {
		err = json.Unmarshal(b, &rn)
	}
	if err != nil {
		// A claim is renewed right after it is made; a missing or bad
		// renewal is judged by the claim's age.
		fi, serr := f.Stat()
		if serr == nil && time.Since(fi.ModTime()) < l.cfg.TTL {
			return true, holder, ""
		}
		return false, holder, "no valid renewal: " + fmt.Sprint(err)
	}
	if age := l.cfg.Now() - time.Duration(rn.RenewedNs); age > time.Duration(rn.TTLNs) {
		return false, holder, fmt.Sprintf("expired (last renewed %v ago, ttl %v)", age.Round(time.Millisecond), time.Duration(rn.TTLNs))
	}
	return true, holder, ""
}

func (l *Local) floor() uint64 {
	if l.cfg.EpochFile == "" {
		return 0
	}
	b, _, err := epochFormat().Load(l.cfg.EpochFile)
	if err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			l.cfg.Log.Warn("durable epoch unreadable; using the lease directory's", "file", l.cfg.EpochFile, "err", err)
		}
		return 0
	}
	n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return 0
	}
	return n
}

// TryAcquire takes the lease if it is free (no claim, or the holder dead
// or expired). It returns (0, nil) when another agent holds it.
func (l *Local) TryAcquire() (uint64, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.claim != nil {
		return l.epoch, nil
	}
	n, err := l.highest()
	if err != nil {
		return 0, err
	}
	if n > 0 {
		alive, holder, why := l.state(n)
		l.seenN, l.seenBy = n, holder
		if alive {
			return 0, nil
		}
		l.cfg.Log.Info("lease free", "epoch", n, "holder", holder, "why", why)
	}
	next := max(n, l.floor()) + 1
	if err := l.claimEpoch(next); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return 0, nil // another standby won
		}
		return 0, err
	}
	return next, nil
}

// claimEpoch creates claim next, locked, or fails with fs.ErrExist.
func (l *Local) claimEpoch(next uint64) error {
	dir := filepath.Dir(l.cfg.Path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(l.cfg.Path)+".claim-*")
	if err != nil {
		return fmt.Errorf("lease: %w", err)
	}
	defer os.Remove(tmp.Name())
	rec := Record{Holder: l.cfg.Holder, PID: os.Getpid(), Epoch: next, Acquired: time.Now().UTC()}
	b, _ := json.Marshal(rec)
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return fmt.Errorf("lease: %w", err)
	}
	if err := unix.Flock(int(tmp.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		tmp.Close()
		return fmt.Errorf("lease: lock claim: %w", err)
	}
	if err := os.Link(tmp.Name(), l.claimPath(next)); err != nil {
		tmp.Close()
		if errors.Is(err, fs.ErrExist) {
			return fs.ErrExist
		}
		return fmt.Errorf("lease: claim epoch %d: %w", next, err)
	}
	l.claim, l.epoch, l.seenN, l.seenBy = tmp, next, next, l.cfg.Holder
	if err := l.renewLocked(); err != nil {
		return err
	}
	// The claim is made; the rest is bookkeeping.
	if err := atomicfile.SyncDir(dir); err != nil {
		l.cfg.Log.Warn("lease dir not synced", "err", err)
	}
	if l.cfg.EpochFile != "" {
		if err := epochFormat().Save(l.cfg.EpochFile, []byte(strconv.FormatUint(next, 10)+"\n"), atomicfile.Options{}); err != nil {
			l.cfg.Log.Warn("durable epoch not written", "file", l.cfg.EpochFile, "err", err)
		}
	}
	if err := leaseFormat().Save(l.cfg.Path, b, atomicfile.Options{}); err != nil {
		l.cfg.Log.Warn("lease file not written", "err", err)
	}
	// Old claims are history; keep the previous one for operators.
	if ns, err := l.claims(); err == nil {
		for _, n := range ns {
			if n+1 < next {
				os.Remove(l.claimPath(n))
				os.Remove(l.claimPath(n) + ".renew")
			}
		}
	}
	return nil
}

func (l *Local) renewLocked() error {
	now := l.cfg.Now()
	b, _ := json.Marshal(renewal{RenewedNs: int64(now), TTLNs: int64(l.cfg.TTL)})
	if err := renewFormat().Save(l.claimPath(l.epoch)+".renew", b, atomicfile.Options{}); err != nil {
		return fmt.Errorf("lease: renew: %w", err)
	}
	l.renew = now
	return nil
}

// Acquire waits, as a standby, until the lease is ours.
func (l *Local) Acquire(ctx context.Context) (uint64, error) {
	t := time.NewTicker(l.cfg.Poll)
	defer t.Stop()
	for {
		n, err := l.TryAcquire()
		if err != nil {
			l.cfg.Log.Warn("lease", "err", err)
		} else if n > 0 {
			return n, nil
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-t.C:
		}
	}
}

// Check confirms that this agent still holds the newest epoch, renewing
// the claim when it is due (a holder that was stopped past its TTL and
// not superseded keeps the lease). It returns a *LostError when another
// agent has claimed a newer epoch.
func (l *Local) Check(ctx context.Context) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.claim == nil {
		return &LostError{Current: l.seenN, Holder: l.seenBy}
	}
	n, err := l.highest()
	if err != nil {
		return err
	}
	if n != l.epoch {
		rec, _ := readRecord(l.claimPath(n))
		l.seenN, l.seenBy = n, rec.Holder
		return &LostError{Mine: l.epoch, Current: n, Holder: rec.Holder}
	}
	if l.cfg.Now()-l.renew > l.cfg.TTL/3 {
		return l.renewLocked()
	}
	return nil
}

// Renew runs Check every TTL/3 until ctx ends or the lease is lost, and
// returns the loss.
func (l *Local) Renew(ctx context.Context) error {
	t := time.NewTicker(l.cfg.TTL / 3)
	defer t.Stop()
	for {
		if err := l.Check(ctx); errors.Is(err, ErrLost) {
			return err
		} else if err != nil {
			l.cfg.Log.Warn("lease renewal", "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// Release gives the lease up: the claim is unlocked so a standby takes
// over at its next look, without waiting for the TTL. A lease already
// lost is only forgotten.
func (l *Local) Release() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.claim == nil {
		return nil
	}
	err := l.claim.Close()
	l.claim = nil
	if err != nil {
		return fmt.Errorf("lease: release: %w", err)
	}
	return nil
}

// Current returns the newest epoch and holder seen.
func (l *Local) Current() (uint64, string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.seenN, l.seenBy
}

// Held reports whether this agent holds the lease, and its epoch.
func (l *Local) Held() (uint64, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.epoch, l.claim != nil
}

// readLeaseFile reads the operators' lease file.
func readLeaseFile(path string) (Record, error) {
	var r Record
	b, _, err := leaseFormat().Load(path)
	if err != nil {
		return r, err
	}
	if err := json.Unmarshal(b, &r); err != nil {
		return r, fmt.Errorf("lease: %s: %w", path, err)
	}
	return r, nil
}

// ReadLeaseFile returns the holder and epoch recorded in the lease file at
// path (for arsctl and tests).
func ReadLeaseFile(path string) (Record, error) { return readLeaseFile(path) }
