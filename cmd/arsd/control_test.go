package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ars-dev/ars/agent"
	"github.com/ars-dev/ars/agent/authz"
	"github.com/ars-dev/ars/agent/executor"
	"github.com/ars-dev/ars/agent/status"
	"github.com/ars-dev/ars/internal/testutil"
	"github.com/ars-dev/ars/ipc"
	"github.com/ars-dev/ars/mapper"
	"github.com/ars-dev/ars/synthesizer"
)

// Environment of the helper processes this test binary becomes.
const (
	helperEnv = "ARS_TEST_CONTROL_HELPER" // args socket, method, params JSON → JSON reply on stdout
	arsdEnv   = "ARS_TEST_RUN_ARSD"       // run arsd's main with the remaining arguments
)

func TestMain(m *testing.M) {
	switch {
	case os.Getenv(helperEnv) == "1":
		os.Exit(controlHelper(os.Args[1:]))
	case os.Getenv(arsdEnv) == "1":
		os.Args = append([]string{"arsd"}, os.Args[1:]...)
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// helperReply is what the helper prints.
type helperReply struct {
	Result json.RawMessage `json:"result,omitempty"`
	Error  string          `json:"error,omitempty"`
}

func controlHelper(args []string) int {
	if len(args) != 3 {
		fmt.Fprintln(os.Stderr, "helper: want socket, method, params")
		return 2
	}
	var params any
	if args[2] != "" {
		params = json.RawMessage(args[2])
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var res json.RawMessage
	var r helperReply
	if err := ipc.Call(ctx, args[0], args[1], params, &res); err != nil {
		r.Error = err.Error()
	} else {
		r.Result = res
	}
	json.NewEncoder(os.Stdout).Encode(r)
	return 0
}

// testPolicy grants by numeric id, so no account needs to exist:
// 65534 is tenant acme (VM web), 65533 tenant beta (VM db), 65532 a
// viewer, group 4242 operators; 65530 holds nothing.
const testPolicy = `
roles:
  viewer:   {users: ["65532"]}
  operator: {groups: ["4242"]}
tenants:
  acme: {users: ["65534"], vms: [web]}
  beta: {users: ["65533"], vms: [db]}
`

type apiFixture struct {
	api   *controlAPI
	slas  *agent.SLAStore
	audit string
	sock  string
}

func newAPIFixture(t *testing.T, dir string) *apiFixture {
	t.Helper()
	policy, err := authz.Parse([]byte(testPolicy), authz.OSResolver{})
	if err != nil {
		t.Fatal(err)
	}
	auditPath := filepath.Join(dir, "audit.log")
	al, err := executor.OpenAudit(auditPath)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { al.Close() })
	vms := map[string]synthesizer.SLA{
		"web": {CPU: synthesizer.CPUSLA{FloorMillicores: 200, CeilingMillicores: 1000}},
		"db":  {CPU: synthesizer.CPUSLA{FloorMillicores: 300, CeilingMillicores: 1500}},
	}
	slas, err := agent.NewSLAStore(synthesizer.DefaultSLA(), vms, synthesizer.Capacity{}, filepath.Join(dir, "sla.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	board := &status.Board{}
	board.Publish(status.Snapshot{Tick: 1, VMs: []status.VM{{Name: "db", PID: 10}, {Name: "web", PID: 20}}})
	drm := mapper.New()
	drm.Put(mapper.VM{Name: "web", PID: 20})
	drm.Put(mapper.VM{Name: "db", PID: 10})
	f := &apiFixture{slas: slas, audit: auditPath, sock: filepath.Join(dir, "run", "arsd.sock")}
	f.api = newControlAPI(controlDeps{Board: board, DRM: drm, SLAs: slas, Policy: policy,
		Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
		Audit: func(r executor.Record) error {
			if err := al.Append(r); err != nil {
				return err
			}
			return al.Sync()
		}})
	return f
}

// call runs one method in-process as peer, through the gate and handler.
func (f *apiFixture) call(peer ipc.Peer, method, params string) (json.RawMessage, error) {
	if err := f.api.gate(peer, method); err != nil {
		return nil, fmt.Errorf("permission denied: %w", err)
	}
	res, err := f.api.handler(method)(context.Background(), peer, json.RawMessage(params))
	if err != nil {
		return nil, err
	}
	return json.Marshal(res)
}

func readRecords(t *testing.T, path string) []executor.Record {
	t.Helper()
	if _, err := executor.VerifyFile(path); err != nil {
		t.Fatalf("audit log does not verify: %v", err)
	}
	fh, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	var out []executor.Record
	sc := bufio.NewScanner(fh)
	for sc.Scan() {
		var r executor.Record
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatal(err)
		}
		out = append(out, r)
	}
	return out
}

func hasRecord(rs []executor.Record, kind, actorPart, vm, target, result string) bool {
	for _, r := range rs {
		if r.Kind == kind && strings.Contains(r.Actor, actorPart) && r.VM == vm && r.Target == target &&
			strings.HasPrefix(r.Result, result) {
			return true
		}
	}
	return false
}

const (
	setWeb = `{"vm":"web","sla":"cpu: {floorMillicores: 250, ceilingMillicores: 900}\n"}`
	setDB  = `{"vm":"db","sla":"cpu: {floorMillicores: 350, ceilingMillicores: 1200}\n"}`
	getWeb = `{"vm":"web"}`
	getDB  = `{"vm":"db"}`
)

// TestControlAPIPolicy runs the decisions in-process with fabricated peers
// (no root needed); TestControlAPIAsOtherUIDs proves the same through
// the kernel's SO_PEERCRED.
func TestControlAPIPolicy(t *testing.T) {
	f := newAPIFixture(t, t.TempDir())
	root := ipc.Peer{PID: 1, UID: 0, GID: 0}
	tenant := ipc.Peer{PID: 2, UID: 65534, GID: 65534}
	stranger := ipc.Peer{PID: 3, UID: 65530, GID: 65530}
	viewer := ipc.Peer{PID: 4, UID: 65532, GID: 65532}
	operator := ipc.Peer{PID: 5, UID: 65531, GID: 65531, Groups: []uint32{4242}}

	for _, c := range []struct {
		name          string
		peer          ipc.Peer
		method, param string
		ok            bool
	}{
		{"stranger status", stranger, "status", "", false},
		{"stranger vms", stranger, "vms", "", false},
		{"stranger drm", stranger, "drm", "", false},
		{"stranger sla.get", stranger, "sla.get", getWeb, false},
		{"stranger sla.set", stranger, "sla.set", setWeb, false},
		{"tenant sets own", tenant, "sla.set", setWeb, true},
		{"tenant sets other", tenant, "sla.set", setDB, false},
		{"tenant reads other", tenant, "sla.get", getDB, false},
		{"tenant reads own", tenant, "sla.get", getWeb, true},
		{"tenant status", tenant, "status", "", false},
		{"viewer status", viewer, "status", "", true},
		{"viewer reads db", viewer, "sla.get", getDB, true},
		{"viewer sets db", viewer, "sla.set", setDB, false},
		{"operator by group sets db", operator, "sla.set", setDB, true},
		{"root status", root, "status", "", true},
		{"unknown method", root, "shutdown", "", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := f.call(c.peer, c.method, c.param)
			if (err == nil) != c.ok {
				t.Fatalf("err = %v, want ok=%v", err, c.ok)
			}
			if !c.ok && !strings.Contains(err.Error(), "permission denied") && !strings.Contains(err.Error(), "not part of") {
				t.Fatalf("denial does not say so: %v", err)
			}
		})
	}
	// A tenant's fleet-wide reads are cut down to its VMs.
	res, err := f.call(tenant, "vms", "")
	if err != nil {
		t.Fatal(err)
	}
	var vms []status.VM
	json.Unmarshal(res, &vms)
	if len(vms) != 1 || vms[0].Name != "web" {
		t.Fatalf("tenant vms: %s", res)
	}
	res, _ = f.call(tenant, "drm", "")
	var snap mapper.Snapshot
	json.Unmarshal(res, &snap)
	if len(snap.VMs) != 1 || snap.VMs[0].Name != "web" {
		t.Fatalf("tenant drm: %s", res)
	}
	if s, src := f.slas.For("web"); s.CPU.FloorMillicores != 250 || src != "set" {
		t.Fatalf("web SLA %+v from %s", s, src)
	}
	if s, _ := f.slas.For("db"); s.CPU.FloorMillicores != 350 {
		t.Fatalf("db SLA %+v (operator's set lost)", s)
	}
	recs := readRecords(t, f.audit)
	for _, want := range []struct{ kind, actor, vm, target, result string }{
		{"control.sla.set", "uid=65534", "web", "sla", "requested"},
		{"control.sla.set", "uid=65534", "web", "sla", "ok"},
		{"control.denied", "uid=65534", "db", "sla.set", "denied"},
		{"control.denied", "uid=65534", "db", "sla.get", "denied"},
		{"control.denied", "uid=65530", "", "sla.set", "denied"},
		{"control.denied", "uid=65532", "db", "sla.set", "denied"},
		{"control.sla.set", "uid=65531", "db", "sla", "ok"},
		{"control.denied", "uid=0", "", "shutdown", "denied"},
	} {
		if !hasRecord(recs, want.kind, want.actor, want.vm, want.target, want.result) {
			t.Errorf("no audit record %+v in\n%s", want, dumpRecords(recs))
		}
	}
}

func dumpRecords(rs []executor.Record) string {
	var b strings.Builder
	for _, r := range rs {
		fmt.Fprintf(&b, "  %s %s vm=%s target=%s result=%s reason=%s\n", r.Kind, r.Actor, r.VM, r.Target, r.Result, r.Reason)
	}
	return b.String()
}

func TestControlAPIInputValidation(t *testing.T) {
	f := newAPIFixture(t, t.TempDir())
	root := ipc.Peer{UID: 0}
	for name, params := range map[string]string{
		"unknown param":     `{"vm":"web","slA":"x"}`,
		"no vm":             `{"sla":"cpu: {floorMillicores: 100}"}`,
		"bad vm":            `{"vm":"../etc"}`,
		"empty sla":         `{"vm":"web","sla":""}`,
		"unknown sla key":   `{"vm":"web","sla":"cpu: {floor: 100}"}`,
		"invalid sla":       `{"vm":"web","sla":"cpu: {floorMillicores: 5, ceilingMillicores: 1}"}`,
		"two docs":          `{"vm":"web","sla":"cpu: {floorMillicores: 100, ceilingMillicores: 200}\n---\n{}"}`,
		"too big":           `{"vm":"web","sla":"` + strings.Repeat("#", maxSLAText+1) + `"}`,
		"floors over total": `{"vm":"web","sla":"cpu: {floorMillicores: 100000000, ceilingMillicores: 100000000}"}`,
	} {
		if _, err := f.call(root, "sla.set", params); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, err := f.call(root, "status", `{"x":1}`); err == nil {
		t.Error("status with params accepted")
	}
	if s, src := f.slas.For("web"); s.CPU.FloorMillicores != 200 || src != "config" {
		t.Fatalf("a rejected set changed the SLA: %+v %s", s, src)
	}
}

func TestDenialAuditRateLimited(t *testing.T) {
	l := newDenialLimiter()
	now := time.Unix(1000, 0)
	n := 0
	for i := 0; i < 100; i++ {
		if ok, _ := l.allow(7, now); ok {
			n++
		}
	}
	if n != denialBurst {
		t.Fatalf("recorded %d of a burst of 100, want %d", n, denialBurst)
	}
	ok, dropped := l.allow(7, now.Add(denialEvery))
	if !ok || dropped != 100-denialBurst {
		t.Fatalf("after refill: %v, dropped %d", ok, dropped)
	}
	if ok, _ := l.allow(8, now); !ok {
		t.Fatal("another uid limited")
	}
}

// TestControlAPIAsOtherUIDs runs real clients under other uids (the test
// binary re-executed with SysProcAttr.Credential) against the real
// socket: the kernel's SO_PEERCRED/SO_PEERGROUPS identify them.
func TestControlAPIAsOtherUIDs(t *testing.T) {
	testutil.RequirePrivileged(t)
	top, err := os.MkdirTemp("", "ars-ctl-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(top) })
	if err := os.Chmod(top, 0o755); err != nil {
		t.Fatal(err)
	}
	// The helpers run this binary: copy it where uid 65534 can exec it.
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(top, "helper")
	b, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, b, 0o755); err != nil {
		t.Fatal(err)
	}
	state := filepath.Join(top, "state")
	if err := os.Mkdir(state, 0o700); err != nil {
		t.Fatal(err)
	}
	f := newAPIFixture(t, state)
	f.sock = filepath.Join(top, "run", "arsd.sock")
	ctl := ipc.NewServer(f.sock, f.api.gate, slog.New(slog.NewTextHandler(io.Discard, nil)))
	ctl.SetShared(f.api.d.Policy.Shared())
	f.api.register(ctl)
	if err := ctl.Listen(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { ctl.Serve(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	if st, _ := os.Stat(f.sock); st.Mode().Perm() != 0o666 {
		t.Fatalf("shared policy, socket mode %04o", st.Mode().Perm())
	}

	as := func(uid, gid uint32, groups []uint32, method, params string) helperReply {
		t.Helper()
		cmd := exec.Command(bin, f.sock, method, params)
		cmd.Env = []string{helperEnv + "=1"}
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid, Groups: groups}}
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("helper as uid %d: %v (%s)", uid, err, out)
		}
		var r helperReply
		if err := json.Unmarshal(out, &r); err != nil {
			t.Fatalf("helper output %q: %v", out, err)
		}
		return r
	}
	denied := func(r helperReply) bool { return strings.Contains(r.Error, "permission denied") }

	// A uid the policy does not name: every call denied, reads included.
	for _, c := range []struct{ method, params string }{
		{"status", ""}, {"vms", ""}, {"drm", ""}, {"sla.get", getWeb}, {"sla.set", setWeb}, {"sla.set", setDB},
	} {
		if r := as(65530, 65530, nil, c.method, c.params); !denied(r) {
			t.Errorf("uid 65530 %s %s: %+v, want denied", c.method, c.params, r)
		}
	}
	// Tenant acme (uid 65534): its own VM yes, the other no.
	if r := as(65534, 65534, nil, "sla.set", setWeb); r.Error != "" {
		t.Fatalf("tenant setting its own VM: %s", r.Error)
	}
	if r := as(65534, 65534, nil, "sla.get", getWeb); r.Error != "" || !strings.Contains(string(r.Result), "floorMillicores: 250") {
		t.Fatalf("tenant reading its own VM: %+v", r)
	}
	for _, c := range []struct{ method, params string }{{"sla.set", setDB}, {"sla.get", getDB}, {"status", ""}} {
		if r := as(65534, 65534, nil, c.method, c.params); !denied(r) {
			t.Errorf("tenant %s %s: %+v, want denied", c.method, c.params, r)
		}
	}
	if r := as(65534, 65534, nil, "vms", ""); r.Error != "" || strings.Contains(string(r.Result), `"db"`) ||
		!strings.Contains(string(r.Result), `"web"`) {
		t.Errorf("tenant vms not limited to its VMs: %+v", r)
	}
	// A viewer reads everything and changes nothing.
	if r := as(65532, 65532, nil, "sla.get", getDB); r.Error != "" {
		t.Errorf("viewer read: %s", r.Error)
	}
	if r := as(65532, 65532, nil, "sla.set", setDB); !denied(r) {
		t.Errorf("viewer set: %+v, want denied", r)
	}
	// An operator through a supplementary group (SO_PEERGROUPS).
	if r := as(65531, 65531, nil, "sla.set", setDB); !denied(r) {
		t.Errorf("uid 65531 without its group: %+v, want denied", r)
	}
	if r := as(65531, 65531, []uint32{4242}, "sla.set", setDB); r.Error != "" {
		t.Errorf("operator by supplementary group: %s", r.Error)
	}
	if s, _ := f.slas.For("web"); s.CPU.FloorMillicores != 250 {
		t.Errorf("web SLA %+v", s)
	}
	if s, _ := f.slas.For("db"); s.CPU.FloorMillicores != 350 {
		t.Errorf("db SLA %+v", s)
	}
	recs := readRecords(t, f.audit)
	for _, want := range []struct{ kind, actor, vm, target, result string }{
		{"control.sla.set", "uid=65534 gid=65534", "web", "sla", "ok"},
		{"control.denied", "uid=65534 gid=65534", "db", "sla.set", "denied"},
		{"control.denied", "uid=65534 gid=65534", "db", "sla.get", "denied"},
		{"control.denied", "uid=65530 gid=65530", "", "sla.set", "denied"},
		{"control.denied", "uid=65530 gid=65530", "", "status", "denied"},
		{"control.denied", "uid=65532", "db", "sla.set", "denied"},
		{"control.sla.set", "uid=65531", "db", "sla", "ok"},
	} {
		if !hasRecord(recs, want.kind, want.actor, want.vm, want.target, want.result) {
			t.Errorf("no audit record %+v in\n%s", want, dumpRecords(recs))
		}
	}
	for _, r := range recs {
		if !strings.Contains(r.Actor, "pid=") || strings.Contains(r.Actor, "pid=0") {
			t.Errorf("record without the peer's pid: %+v", r)
		}
	}

	// Without a policy file the socket admits root only, and says so.
	rootOnly, _ := newControlServer(filepath.Join(top, "private", "arsd.sock"), controlDeps{
		Board: &status.Board{}, DRM: mapper.New(), Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err := rootOnly.Listen(); err != nil {
		t.Fatal(err)
	}
	ctx2, cancel2 := context.WithCancel(context.Background())
	done2 := make(chan struct{})
	go func() { rootOnly.Serve(ctx2); close(done2) }()
	t.Cleanup(func() { cancel2(); <-done2 })
	f.sock = filepath.Join(top, "private", "arsd.sock")
	if r := as(65534, 65534, nil, "status", ""); !strings.Contains(r.Error, "admits root only") {
		t.Errorf("root-only socket as uid 65534: %+v", r)
	}
	var snap status.Snapshot
	if err := ipc.Call(ctx2, f.sock, "status", nil, &snap); err != nil {
		t.Errorf("root on the root-only socket: %v", err)
	}
}

// TestArsdPolicyEndToEnd runs arsd itself with a policy file and a config
// naming two VMs; a tenant (uid 65534, a re-executed helper) sets its own
// VM's SLA and is refused the other's, and arsd's audit log records both.
func TestArsdPolicyEndToEnd(t *testing.T) {
	testutil.RequirePrivileged(t)
	top, err := os.MkdirTemp("", "ars-e2e-policy-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(top) })
	if err := os.Chmod(top, 0o755); err != nil {
		t.Fatal(err)
	}
	self, _ := os.Executable()
	b, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(top, "helper")
	if err := os.WriteFile(bin, b, 0o755); err != nil {
		t.Fatal(err)
	}
	policy := filepath.Join(top, "policy.yaml")
	cfg := filepath.Join(top, "ars.yaml")
	os.WriteFile(policy, []byte(testPolicy), 0o644)
	os.WriteFile(cfg, []byte("vms:\n  web: {cpu: {floorMillicores: 200, ceilingMillicores: 1000}}\n"+
		"  db: {cpu: {floorMillicores: 300, ceilingMillicores: 1500}}\n"), 0o644)
	a := startArsd(t, top, nil, "--config", cfg, "--control-policy", policy)
	a.waitTick(t)
	if st, err := os.Stat(a.sock); err != nil || st.Mode().Perm() != 0o666 {
		t.Fatalf("socket with a shared policy: %v %v", st, err)
	}
	call := func(uid uint32, method, params string) helperReply {
		cmd := exec.Command(bin, a.sock, method, params)
		cmd.Env = []string{helperEnv + "=1"}
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("helper: %v %s", err, out)
		}
		var r helperReply
		json.Unmarshal(out, &r)
		return r
	}
	if r := call(65534, "sla.set", setWeb); r.Error != "" {
		t.Fatalf("tenant set own VM: %s\n%s", r.Error, a.log())
	}
	if r := call(65534, "sla.set", setDB); !strings.Contains(r.Error, "permission denied") {
		t.Fatalf("tenant set other VM: %+v", r)
	}
	if r := call(65530, "vms", ""); !strings.Contains(r.Error, "permission denied") {
		t.Fatalf("stranger vms: %+v", r)
	}
	// The set survives in arsd's store: root reads it back.
	var v SLAView
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := ipc.Call(ctx, a.sock, "sla.get", map[string]string{"vm": "web"}, &v); err != nil ||
		v.Source != "set" || !strings.Contains(v.SLA, "floorMillicores: 250") {
		t.Fatalf("sla.get web as root: %+v %v", v, err)
	}
	recs := readRecords(t, filepath.Join(a.state, "audit.log"))
	if !hasRecord(recs, "control.sla.set", "uid=65534", "web", "sla", "ok") ||
		!hasRecord(recs, "control.denied", "uid=65534", "db", "sla.set", "denied") ||
		!hasRecord(recs, "control.denied", "uid=65530", "", "vms", "denied") {
		t.Fatalf("arsd's audit log lacks the change or a denial:\n%s", dumpRecords(recs))
	}
	if !strings.Contains(a.log(), "control policy") || !strings.Contains(a.log(), "socket_shared=true") {
		t.Errorf("arsd did not log its policy:\n%s", a.log())
	}
	// SIGHUP reloads the policy: uid 65530 becomes a viewer.
	os.WriteFile(policy, []byte(strings.Replace(testPolicy, `viewer:   {users: ["65532"]}`, `viewer:   {users: ["65532", "65530"]}`, 1)), 0o644)
	if err := a.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		r := call(65530, "vms", "")
		if r.Error == "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("uid 65530 still denied after SIGHUP: %s\n%s", r.Error, a.log())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestPolicyReload(t *testing.T) {
	dir := t.TempDir()
	f := newAPIFixture(t, dir)
	sock := filepath.Join(dir, "run", "arsd.sock")
	ctl, api := newControlServer(sock, controlDeps{Board: &status.Board{}, DRM: mapper.New(), SLAs: f.slas,
		Log: slog.New(slog.NewTextHandler(io.Discard, nil)), Audit: f.api.d.Audit})
	if err := ctl.Listen(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { ctl.Serve(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	mode := func() os.FileMode { st, _ := os.Stat(sock); return st.Mode().Perm() }
	if mode() != 0o600 {
		t.Fatalf("root-only socket mode %04o", mode())
	}
	tenant := ipc.Peer{UID: 65534, GID: 65534, PID: 9}
	if api.gate(tenant, "sla.get") == nil {
		t.Fatal("tenant passes the root-only gate")
	}
	path := filepath.Join(dir, "policy.yaml")
	os.WriteFile(path, []byte(testPolicy), 0o644)
	load := func() (*authz.Policy, error) { return authz.Load(path, authz.OSResolver{}) }
	if err := api.reload(ctl, load); err != nil {
		t.Fatal(err)
	}
	if mode() != 0o666 {
		t.Fatalf("shared socket mode %04o", mode())
	}
	if err := api.gate(tenant, "sla.get"); err != nil {
		t.Fatalf("tenant after reload: %v", err)
	}
	// A bad file leaves the policy in force.
	os.WriteFile(path, []byte("roles: {admins: {}}\n"), 0o644)
	if err := api.reload(ctl, load); err == nil {
		t.Fatal("bad policy reloaded")
	}
	if err := api.gate(tenant, "sla.get"); err != nil {
		t.Fatalf("tenant after a failed reload: %v", err)
	}
	os.WriteFile(path, nil, 0o644)
	if err := api.reload(ctl, load); err != nil || mode() != 0o600 || api.gate(tenant, "sla.get") == nil {
		t.Fatalf("back to root only: %v, mode %04o", err, mode())
	}
	recs := readRecords(t, f.audit)
	var results []string
	for _, r := range recs {
		if r.Kind == "control.policy.reload" {
			results = append(results, strings.SplitN(r.Result, ":", 2)[0])
		}
	}
	if strings.Join(results, ",") != "ok,rejected,ok" {
		t.Fatalf("reload records %v", results)
	}
}
