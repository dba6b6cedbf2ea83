package main

// The control API: the methods arsctl calls over the control socket, each
// declared with the access it needs (agent/authz), decided per call on the
// peer's kernel-recorded identity, audited when it changes something or
// is denied.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/ars-dev/ars/agent"
	"github.com/ars-dev/ars/agent/authz"
	"github.com/ars-dev/ars/agent/executor"
	"github.com/ars-dev/ars/agent/status"
	"github.com/ars-dev/ars/ipc"
	"github.com/ars-dev/ars/mapper"
	"github.com/ars-dev/ars/synthesizer"
)

// controlDeps is what the control API serves.
type controlDeps struct {
	Board *status.Board
	DRM   *mapper.Table
	SLAs  *agent.SLAStore
	Log   *slog.Logger
	// Policy decides who may call what; nil is authz.RootOnly().
	Policy *authz.Policy
	// Audit records every change made through the API and every denial,
	// with the peer's identity. The same function the loop records with.
	Audit func(executor.Record) error
	// Epoch is the leader epoch recorded in audit records (nil: 0).
	Epoch func() uint64
	// Now is the clock (nil: time.Now).
	Now func() time.Time
}

// Control API methods.
const (
	methodStatus = "status"
	methodVMs    = "vms"
	methodDRM    = "drm"
	methodSLAGet = "sla.get"
	methodSLASet = "sla.set"
)

// SLAParams are the params of sla.get and sla.set. SLA is the SLA in the
// config's YAML form (sla.set only).
type SLAParams struct {
	VM  string `json:"vm"`
	SLA string `json:"sla,omitempty"`
}

// SLAView is the result of sla.get and sla.set: the SLA in force, as YAML,
// and where it comes from (set, config, default).
type SLAView struct {
	VM     string `json:"vm"`
	Source string `json:"source"`
	SLA    string `json:"sla"`
	// Before is the SLA that was in force before an sla.set.
	Before string `json:"before,omitempty"`
}

// maxSLAText bounds the YAML of one SLA in sla.set.
const maxSLAText = 16 << 10

// method is one registered method and the access it needs.
type method struct {
	access     authz.Access
	filterable bool
	serve      func(ctx context.Context, peer ipc.Peer, d authz.Decision, params json.RawMessage) (any, error)
	// vm extracts the VM the call is about ("" for fleet-wide calls).
	vm func(params json.RawMessage) (string, error)
}

// controlAPI enforces the policy on every method and audits. A method is
// reachable only if it is in methods, declared with the access it needs:
// the gate refuses any method registered on the server some other way,
// root included, so a new method cannot be added without a decision on
// who may call it.
type controlAPI struct {
	d       controlDeps
	methods map[string]method
	denials *denialLimiter
	// policy is d.Policy, replaced as a whole by reload.
	policy atomic.Pointer[authz.Policy]
}

func newControlAPI(d controlDeps) *controlAPI {
	if d.Policy == nil {
		d.Policy = authz.RootOnly()
	}
	if d.Now == nil {
		d.Now = time.Now
	}
	if d.Epoch == nil {
		d.Epoch = func() uint64 { return 0 }
	}
	a := &controlAPI{d: d, methods: map[string]method{}, denials: newDenialLimiter()}
	a.policy.Store(d.Policy)
	fleet := func(params json.RawMessage) (string, error) {
		return "", ipc.DecodeParams(params, &struct{}{})
	}
	a.methods[methodStatus] = method{access: authz.Read, vm: fleet, serve: a.status}
	a.methods[methodVMs] = method{access: authz.Read, filterable: true, vm: fleet, serve: a.vms}
	a.methods[methodDRM] = method{access: authz.Read, filterable: true, vm: fleet, serve: a.drm}
	a.methods[methodSLAGet] = method{access: authz.Read, vm: slaVM, serve: a.slaGet}
	a.methods[methodSLASet] = method{access: authz.Write, vm: slaVM, serve: a.slaSet}
	return a
}

// newControlServer builds the control socket server for d: its gate is the
// policy, the socket is shared (0666) only when the policy grants someone
// other than root, and every method goes through the policy.
func newControlServer(path string, d controlDeps) (*ipc.Server, *controlAPI) {
	a := newControlAPI(d)
	ctl := ipc.NewServer(path, a.gate, d.Log)
	ctl.SetShared(a.policy.Load().Shared())
	a.register(ctl)
	return ctl, a
}

func (a *controlAPI) register(ctl *ipc.Server) {
	for name := range a.methods {
		ctl.Register(name, a.handler(name))
	}
}

func identity(p ipc.Peer) authz.Identity {
	return authz.Identity{PID: p.PID, UID: p.UID, GID: p.GID, Groups: p.Groups}
}

// gate runs before any handler: the method must be one of this API's
// (so that nothing registered around it is reachable) and the peer must
// hold some grant in the policy.
func (a *controlAPI) gate(peer ipc.Peer, name string) error {
	if _, ok := a.methods[name]; !ok {
		err := fmt.Errorf("method %s is not part of the authorized control API", name)
		a.denied(peer, name, "", err.Error())
		return err
	}
	if p := a.policy.Load(); !p.Known(identity(peer)) {
		reason := fmt.Sprintf("uid %d (gid %d) holds no role and owns no VM in the %s", peer.UID, peer.GID, p.Source())
		a.denied(peer, name, "", reason)
		return errors.New(reason)
	}
	return nil
}

func (a *controlAPI) handler(name string) ipc.Handler {
	m := a.methods[name]
	return func(ctx context.Context, peer ipc.Peer, params json.RawMessage) (any, error) {
		vm, err := m.vm(params)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		d := a.policy.Load().Decide(identity(peer), authz.Op{Method: name, Access: m.access, VM: vm, Filterable: m.filterable})
		if !d.Allow {
			a.denied(peer, name, vm, d.Reason)
			return nil, fmt.Errorf("permission denied: %s", d.Reason)
		}
		return m.serve(ctx, peer, d, params)
	}
}

// denied logs and audits a refused call (audits of one uid are rate
// limited; the next recorded denial says how many were not).
func (a *controlAPI) denied(peer ipc.Peer, name, vm, reason string) {
	a.d.Log.Warn("control: permission denied", "uid", peer.UID, "gid", peer.GID, "pid", peer.PID,
		"method", name, "vm", vm, "reason", reason)
	now := a.d.Now()
	ok, dropped := a.denials.allow(peer.UID, now)
	if !ok || a.d.Audit == nil {
		return
	}
	if dropped > 0 {
		reason = fmt.Sprintf("%s (%d earlier denials of uid %d not recorded: rate limit)", reason, dropped, peer.UID)
	}
	if err := a.d.Audit(executor.Record{Time: now.UTC(), Actor: actor(peer), VM: vm, Kind: "control.denied",
		Target: name, Reason: reason, Epoch: a.d.Epoch(), Result: "denied"}); err != nil {
		a.d.Log.Error("control: cannot audit a denial", "err", err)
	}
}

func actor(p ipc.Peer) string { return "control " + p.String() }

// reload puts the policy load returns in force, and the socket's mode
// with it (0666 when shared, 0600 otherwise). On any error the policy in
// force stays. Either way it is logged and audited.
func (a *controlAPI) reload(ctl *ipc.Server, load func() (*authz.Policy, error)) error {
	old := a.policy.Load()
	rec := executor.Record{Time: a.d.Now().UTC(), Actor: "arsd", Kind: "control.policy.reload", Target: "policy",
		Before: old.Summary(), Reason: "SIGHUP", Epoch: a.d.Epoch(), Result: "ok"}
	p, err := load()
	if err == nil && p.Shared() != old.Shared() {
		err = ctl.Reshare(p.Shared())
	}
	if err != nil {
		rec.Result = "rejected: " + err.Error()
		a.d.Log.Error("control policy not reloaded; the previous one stays in force", "err", err)
	} else {
		a.policy.Store(p)
		rec.After = p.Summary()
		a.d.Log.Info("control policy reloaded", "source", p.Source(), "grants", p.Summary(), "socket_shared", p.Shared())
	}
	if a.d.Audit != nil {
		if aerr := a.d.Audit(rec); aerr != nil {
			a.d.Log.Error("control: cannot audit the policy reload", "err", aerr)
		}
	}
	return err
}

// reloadOnHUP reloads the policy file at path on every SIGHUP until ctx
// ends. Without a policy file there is nothing to reload.
func (a *controlAPI) reloadOnHUP(ctx context.Context, ctl *ipc.Server, path string) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	for {
		select {
		case <-ctx.Done():
			return
		case <-hup:
			if path == "" {
				a.d.Log.Warn("SIGHUP: no control policy file configured; root only stays in force")
				continue
			}
			a.reload(ctl, func() (*authz.Policy, error) { return authz.Load(path, authz.OSResolver{}) })
		}
	}
}

func (a *controlAPI) status(_ context.Context, _ ipc.Peer, _ authz.Decision, _ json.RawMessage) (any, error) {
	return a.d.Board.Latest(), nil
}

func (a *controlAPI) vms(_ context.Context, _ ipc.Peer, d authz.Decision, _ json.RawMessage) (any, error) {
	vms := a.d.Board.Latest().VMs
	if d.VMs == nil {
		return vms, nil
	}
	out := []status.VM{}
	for _, v := range vms {
		if d.VMs[v.Name] {
			out = append(out, v)
		}
	}
	return out, nil
}

func (a *controlAPI) drm(_ context.Context, _ ipc.Peer, d authz.Decision, _ json.RawMessage) (any, error) {
	snap := a.d.DRM.Snapshot()
	if d.VMs == nil {
		return snap, nil
	}
	out := mapper.Snapshot{Generation: snap.Generation}
	for _, v := range snap.VMs {
		if d.VMs[v.Name] {
			out.VMs = append(out.VMs, v)
		}
	}
	// Loans between a tenant's VM and another's show the other side as
	// "other": a tenant learns that its VM lends or borrows, not to whom.
	for _, l := range snap.Loans {
		if !d.VMs[l.Lender] && !d.VMs[l.Borrower] {
			continue
		}
		if !d.VMs[l.Lender] {
			l.Lender = "other"
		}
		if !d.VMs[l.Borrower] {
			l.Borrower = "other"
		}
		out.Loans = append(out.Loans, l)
	}
	return out, nil
}

// slaVM decodes sla.get/sla.set params strictly and returns the VM.
func slaVM(params json.RawMessage) (string, error) {
	var p SLAParams
	if err := ipc.DecodeParams(params, &p); err != nil {
		return "", err
	}
	if p.VM == "" {
		return "", errors.New("params.vm is required")
	}
	if !synthesizer.ValidVMName(p.VM) {
		return "", fmt.Errorf("bad VM name %q (letters, digits, '_', '.', '-'; at most 63)", trunc(p.VM, 64))
	}
	return p.VM, nil
}

func (a *controlAPI) slaGet(_ context.Context, _ ipc.Peer, _ authz.Decision, params json.RawMessage) (any, error) {
	if a.d.SLAs == nil {
		return nil, errors.New("sla.get: no SLA store")
	}
	var p SLAParams
	if err := ipc.DecodeParams(params, &p); err != nil {
		return nil, err
	}
	if p.SLA != "" {
		return nil, errors.New("sla.get: params.sla is for sla.set")
	}
	sla, src := a.d.SLAs.For(p.VM)
	text, err := yaml.Marshal(sla)
	if err != nil {
		return nil, fmt.Errorf("sla.get: encode: %w", err)
	}
	return SLAView{VM: p.VM, Source: src, SLA: string(text)}, nil
}

// ParseSLA decodes one SLA in the config's YAML form: bounded, one
// document, unknown keys rejected, then validated.
func ParseSLA(text string) (synthesizer.SLA, error) {
	var sla synthesizer.SLA
	if len(text) > maxSLAText {
		return sla, fmt.Errorf("SLA of %d bytes, larger than %d", len(text), maxSLAText)
	}
	if strings.TrimSpace(text) == "" {
		return sla, errors.New("empty SLA")
	}
	dec := yaml.NewDecoder(bytes.NewReader([]byte(text)))
	dec.KnownFields(true)
	if err := dec.Decode(&sla); err != nil {
		return synthesizer.SLA{}, fmt.Errorf("SLA: %w", err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return synthesizer.SLA{}, errors.New("SLA: more than one YAML document")
	}
	if err := sla.Validate(); err != nil {
		return synthesizer.SLA{}, fmt.Errorf("SLA: %w", err)
	}
	return sla, nil
}

// slaSet changes a VM's SLA. The request is audited before it is applied
// (a request that cannot be audited is refused) and its outcome after.
func (a *controlAPI) slaSet(_ context.Context, peer ipc.Peer, d authz.Decision, params json.RawMessage) (any, error) {
	if a.d.SLAs == nil {
		return nil, errors.New("sla.set: no SLA store")
	}
	var p SLAParams
	if err := ipc.DecodeParams(params, &p); err != nil {
		return nil, err
	}
	sla, err := ParseSLA(p.SLA)
	if err != nil {
		return nil, fmt.Errorf("sla.set %s: %w", p.VM, err)
	}
	before, _ := a.d.SLAs.For(p.VM)
	rec := executor.Record{Time: a.d.Now().UTC(), Actor: actor(peer), VM: p.VM, Kind: "control.sla.set", Target: "sla",
		Before: flowYAML(before), After: flowYAML(sla), Reason: d.Reason, Epoch: a.d.Epoch(), Result: "requested"}
	if a.d.Audit != nil {
		if err := a.d.Audit(rec); err != nil {
			a.d.Log.Error("control: cannot audit sla.set; refused", "vm", p.VM, "err", err)
			return nil, fmt.Errorf("sla.set %s: not applied: the audit log refused the record: %w", p.VM, err)
		}
	}
	setErr := a.d.SLAs.Set(p.VM, sla)
	rec.Time, rec.Result = a.d.Now().UTC(), "ok"
	if setErr != nil {
		rec.Result = "rejected: " + setErr.Error()
	}
	if a.d.Audit != nil {
		if err := a.d.Audit(rec); err != nil {
			a.d.Log.Error("control: cannot audit the outcome of sla.set", "vm", p.VM, "result", rec.Result, "err", err)
		}
	}
	if setErr != nil {
		return nil, fmt.Errorf("sla.set %s: %w (the SLA in force is unchanged)", p.VM, setErr)
	}
	a.d.Log.Info("control: SLA set", "vm", p.VM, "by", peer.String(), "before", rec.Before, "after", rec.After)
	now, src := a.d.SLAs.For(p.VM)
	text, _ := yaml.Marshal(now)
	btext, _ := yaml.Marshal(before)
	return SLAView{VM: p.VM, Source: src, SLA: string(text), Before: string(btext)}, nil
}

// flowYAML renders v as one line of flow-style YAML, for audit records.
func flowYAML(v any) string {
	var n yaml.Node
	if err := n.Encode(v); err != nil {
		return fmt.Sprintf("%+v", v)
	}
	var flow func(*yaml.Node)
	flow = func(n *yaml.Node) {
		n.Style |= yaml.FlowStyle
		for _, c := range n.Content {
			flow(c)
		}
	}
	flow(&n)
	b, err := yaml.Marshal(&n)
	if err != nil {
		return fmt.Sprintf("%+v", v)
	}
	return strings.TrimSpace(string(b))
}

func trunc(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}

// denialLimiter bounds the denial records one uid can put in the audit
// log: a burst of 20, then one per 3 s. Denials over it are counted and
// the count goes into the next record.
type denialLimiter struct {
	mu    sync.Mutex
	state map[uint32]*bucket
}

type bucket struct {
	tokens  float64
	last    time.Time
	dropped int
}

const (
	denialBurst = 20
	denialEvery = 3 * time.Second
	maxBuckets  = 4096
)

func newDenialLimiter() *denialLimiter { return &denialLimiter{state: map[uint32]*bucket{}} }

// allow takes a token for uid; it returns whether to record, and how many
// denials were dropped since the last recorded one.
func (l *denialLimiter) allow(uid uint32, now time.Time) (bool, int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	b, ok := l.state[uid]
	if !ok {
		if len(l.state) >= maxBuckets {
			for k, v := range l.state { // forget uids not being suppressed
				if v.dropped == 0 {
					delete(l.state, k)
				}
			}
		}
		b = &bucket{tokens: denialBurst, last: now}
		l.state[uid] = b
	}
	b.tokens += float64(now.Sub(b.last)) / float64(denialEvery)
	if b.tokens > denialBurst {
		b.tokens = denialBurst
	}
	b.last = now
	if b.tokens < 1 {
		b.dropped++
		return false, 0
	}
	b.tokens--
	d := b.dropped
	b.dropped = 0
	return true, d
}
