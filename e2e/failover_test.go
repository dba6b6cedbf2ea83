package e2e

// Fault tolerance end to end: two real arsd processes on the shared TCG
// guest, leadership by the local lease (agent/lease), fencing by epoch.

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ars-dev/ars/agent/cgroups"
	"github.com/ars-dev/ars/agent/executor"
	"github.com/ars-dev/ars/agent/telemetry"
	"github.com/ars-dev/ars/internal/testutil"
	"github.com/ars-dev/ars/internal/vm"
)

func vmLoad(cpu int) vm.Load { return vm.Load{CPUPercent: cpu} }

// syncBuf is a log buffer safe to read while the process writes it.
type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// agent is one arsd of a pair, with its own state directory and sockets
// and the pair's shared lease.
type agent struct {
	name   string
	dir    string
	cmd    *exec.Cmd
	log    *syncBuf
	exited chan struct{}
}

// pair holds what the agents of one test share.
type pair struct {
	t      testing.TB
	bin    string
	work   string
	cfg    string
	pinDir string
	extra  []string
}

// newPair builds arsd and prepares the shared lease, config and a private
// bpffs for pinned telemetry, all removed at cleanup.
func newPair(t testing.TB, ceiling int) *pair {
	t.Helper()
	work := t.TempDir()
	p := &pair{t: t, bin: build(t, "./cmd/arsd", work), work: work, cfg: filepath.Join(work, "ars.yaml")}
	os.WriteFile(p.cfg, []byte(fmt.Sprintf("vms:\n  e2e:\n    cpu: {floorMillicores: 200, ceilingMillicores: %d}\n", ceiling)), 0o600)
	// A private bpffs, traversable by the unprivileged telemetry collector.
	bpffs, err := os.MkdirTemp("", "ars-bpffs-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(bpffs, 0o711)
	if err := unix.Mount("bpf", bpffs, "bpf", 0, "mode=0711"); err != nil {
		os.Remove(bpffs)
		t.Fatalf("mount bpffs: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(bpffs, unix.MNT_DETACH); os.Remove(bpffs) })
	p.pinDir = filepath.Join(bpffs, "ars")
	return p
}

func (p *pair) leasePath() string { return filepath.Join(p.work, "run", "lease") }

// start runs agent name (SIGKILLed by PID at cleanup if still running).
func (p *pair) start(name string, args ...string) *agent {
	p.t.Helper()
	a := &agent{name: name, dir: filepath.Join(p.work, name), log: &syncBuf{}, exited: make(chan struct{})}
	all := append([]string{"--config", p.cfg, "--qmp-dir", qmpDir,
		"--control-socket", filepath.Join(a.dir, "arsd.sock"), "--metrics-addr", "off",
		"--state-dir", filepath.Join(a.dir, "state"), "--lease-file", p.leasePath(),
		"--lease-ttl", "1s", "--tick", "200ms", "--bpf-pin-dir", p.pinDir}, p.extra...)
	a.cmd = exec.Command(p.bin, append(all, args...)...)
	a.cmd.Stdout, a.cmd.Stderr = a.log, a.log
	if err := a.cmd.Start(); err != nil {
		p.t.Fatal(err)
	}
	go func() { a.cmd.Wait(); close(a.exited) }()
	p.t.Cleanup(func() {
		a.cmd.Process.Signal(syscall.SIGCONT)
		a.stop(5 * time.Second)
		if p.t.Failed() {
			p.t.Logf("%s log:\n%s", a.name, a.log.String())
		}
	})
	return a
}

// stop sends SIGTERM, then SIGKILL after grace; idempotent.
func (a *agent) stop(grace time.Duration) {
	select {
	case <-a.exited:
		return
	default:
	}
	a.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-a.exited:
	case <-time.After(grace):
		a.cmd.Process.Kill()
		<-a.exited
	}
}

// kill sends SIGKILL and waits until the process is reaped.
func (a *agent) kill() {
	a.cmd.Process.Signal(syscall.SIGKILL)
	<-a.exited
}

// waitLog waits until the agent's log matches re and returns the match.
func (a *agent) waitLog(t testing.TB, re string, limit time.Duration) []string {
	t.Helper()
	rx := regexp.MustCompile(re)
	deadline := time.Now().Add(limit)
	for {
		if m := rx.FindStringSubmatch(a.log.String()); m != nil {
			return m
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: no log line matching %q after %v", a.name, re, limit)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// audit reads the agent's audit records.
func (a *agent) audit(t testing.TB) []executor.Record {
	t.Helper()
	f, err := os.Open(filepath.Join(a.dir, "state", "audit.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var recs []executor.Record
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var r executor.Record
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatalf("%s audit line %q: %v", a.name, sc.Text(), err)
		}
		recs = append(recs, r)
	}
	return recs
}

func writeQuota(t testing.TB, dir string, q int64) {
	t.Helper()
	if err := cgroups.WriteFile(filepath.Join(dir, "cpu.cfs_quota_us"), strconv.FormatInt(q, 10)); err != nil {
		t.Fatal(err)
	}
}

// busyVM makes the shared guest busy with its quota cleared, and leaves it
// idle and unlimited at cleanup.
func busyVM(t testing.TB) string {
	t.Helper()
	v := guest.Get(t)
	cpuDir := v.Cgroup.Dirs["cpu"]
	host, err := cgroups.Detect(cgroups.DefaultPaths())
	if err != nil {
		t.Fatal(err)
	}
	if host.VersionOf("cpu") != cgroups.V1 {
		t.Fatalf("these tests read cpu.cfs_quota_us; cpu controller is %v here", host.VersionOf("cpu"))
	}
	writeQuota(t, cpuDir, -1)
	if err := v.SetLoad(t.Context(), vmLoad(100)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		v.SetLoad(t.Context(), vmLoad(0))
		cgroups.WriteFile(filepath.Join(cpuDir, "cpu.cfs_quota_us"), "-1")
	})
	return cpuDir
}

// TestFailoverKillActiveWhileApplying: the active is killed (SIGKILL)
// right after it applied a plan and with the VM's quota knocked off its
// target; the standby takes the lease and acts within 2 s; afterwards its
// DRM says what the cgroup file says.
func TestFailoverKillActiveWhileApplying(t *testing.T) {
	testutil.RequireBTF(t)
	cpuDir := busyVM(t)
	p := newPair(t, 700)
	a := p.start("a")
	a.waitLog(t, `active: lease acquired" epoch=(\d+)`, 20*time.Second)
	b := p.start("b")
	b.waitLog(t, `standby: following the active`, 20*time.Second)
	waitQuota(t, cpuDir, 20*time.Second, "a raised the busy VM to its ceiling", func(q int64) bool { return q == 70000 })

	killed := time.Now()
	a.kill()
	writeQuota(t, cpuDir, 35000) // half-done: the new active must finish
	waitQuota(t, cpuDir, 2*time.Second, "standby acted after the kill", func(q int64) bool { return q == 70000 })
	took := time.Since(killed)
	m := b.waitLog(t, `active: lease acquired" epoch=(\d+)`, time.Second)
	t.Logf("kill → first action of the new active (epoch %s): %v", m[1], took)
	hot := b.waitLog(t, `hot copy at takeover[^\n]*frames=(\d+)[^\n]*vms=(\d+)`, time.Second)
	if hot[1] == "0" || hot[2] != "1" {
		t.Fatalf("the standby had no hot copy of the active's DRM: %s", hot[0])
	}
	if m[1] != "2" {
		t.Fatalf("new active at epoch %s, want 2", m[1])
	}
	var applied bool
	for _, r := range b.audit(t) {
		if r.Result == "applied" && r.After == "70000" && r.Epoch == 2 {
			applied = true
		}
	}
	if !applied {
		t.Fatalf("b's audit has no applied action at epoch 2: %+v", b.audit(t))
	}

	// The DRM of the new active equals the cgroup file.
	arsctl := build(t, "./cmd/arsctl", p.work)
	time.Sleep(500 * time.Millisecond) // a tick records the read-back
	out, err := exec.Command(arsctl, "--socket", filepath.Join(b.dir, "arsd.sock"), "drm").CombinedOutput()
	if err != nil {
		t.Fatalf("arsctl drm: %v\n%s", err, out)
	}
	want := fmt.Sprintf("quota_us=%d", readQuota(t, cpuDir))
	if !strings.Contains(string(out), "vm/e2e/cpu") || !strings.Contains(string(out), want) {
		t.Fatalf("DRM does not match the cgroup file (%s):\n%s", want, out)
	}
}

// TestFailoverStoppedActiveIsFenced: the active is stopped (SIGSTOP) past
// its lease; the standby takes over; the old one, continued, finds its
// quota drifted and tries to repair it: the write is refused as stale and
// audited, and it steps down to standby.
func TestFailoverStoppedActiveIsFenced(t *testing.T) {
	testutil.RequireBTF(t)
	cpuDir := busyVM(t)
	p := newPair(t, 700)
	a := p.start("a")
	a.waitLog(t, `active: lease acquired" epoch=1`, 20*time.Second)
	b := p.start("b")
	b.waitLog(t, `standby: following the active`, 20*time.Second)
	waitQuota(t, cpuDir, 20*time.Second, "a raised the busy VM to its ceiling", func(q int64) bool { return q == 70000 })

	if err := a.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopped := time.Now()
	b.waitLog(t, `active: lease acquired" epoch=2`, 5*time.Second)
	t.Logf("standby took over %v after the SIGSTOP (lease TTL 1 s)", time.Since(stopped))
	writeQuota(t, cpuDir, 35000) // the old active will want to repair this
	if err := a.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	a.waitLog(t, `lease lost: writes refused, stepping down`, 5*time.Second)
	a.waitLog(t, `stepped down`, 5*time.Second)
	var refused int
	for _, r := range a.audit(t) {
		if r.Result == string(executor.Stale) {
			if r.Epoch != 1 {
				t.Fatalf("refusal of a non-stale epoch: %+v", r)
			}
			refused++
		}
		if r.Result == string(executor.Applied) && r.Time.After(stopped) {
			t.Fatalf("the old active wrote after it was superseded: %+v", r)
		}
	}
	if refused == 0 {
		t.Fatalf("no stale_epoch refusal in the old active's audit: %+v", a.audit(t))
	}
	// The old one is a standby now; the new active repairs the quota.
	a.waitLog(t, `standby: following the active[^\n]*epoch=2`, 5*time.Second)
	waitQuota(t, cpuDir, 10*time.Second, "new active repaired the quota", func(q int64) bool { return q == 70000 })
	if _, err := os.Stat(filepath.Join(a.dir, "state", "audit.log")); err != nil {
		t.Fatal(err)
	}
}

// TestCorruptStateFilesRebuilt: every state file truncated or corrupted
// while the agent is down: it detects each, starts, rebuilds from the
// host and touches no VM.
func TestCorruptStateFilesRebuilt(t *testing.T) {
	testutil.RequireBTF(t)
	cpuDir := busyVM(t)
	p := newPair(t, 700)
	a := p.start("a")
	a.waitLog(t, `active: lease acquired" epoch=1`, 20*time.Second)
	waitQuota(t, cpuDir, 20*time.Second, "busy VM at its ceiling", func(q int64) bool { return q == 70000 })
	a.stop(10 * time.Second)
	v := guest.Get(t)
	v.SetLoad(t.Context(), vmLoad(0))

	state := filepath.Join(a.dir, "state")
	truncate := func(path string, keep int) {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if keep > len(b) {
			keep = len(b) / 2
		}
		os.WriteFile(path, b[:keep], 0o600)
	}
	truncate(filepath.Join(state, "drm.db"), 100)
	truncate(filepath.Join(state, "audit.log"), 150)
	os.WriteFile(filepath.Join(state, "epoch"), []byte("#ars-state kind=epoch v=1 len=2 sha256=00\n9\n"), 0o600)
	truncate(p.leasePath(), 20)
	// SLA overrides whose checksum does not match (a flipped byte).
	os.WriteFile(filepath.Join(state, "sla.yaml"), []byte("#ars-state kind=sla v=1 len=44 sha256="+strings.Repeat("0", 64)+
		"\ne2e:\n  cpu: {floorMillicores: 900, ceilingMillicores: 950}\n"), 0o600)

	a2 := p.start("a")
	a2.waitLog(t, `active: lease acquired" epoch=2`, 20*time.Second)
	a2.waitLog(t, `journal unreadable: moved aside`, time.Second)
	a2.waitLog(t, `audit log did not verify: moved aside`, time.Second)
	a2.waitLog(t, `durable epoch unreadable`, time.Second)
	a2.waitLog(t, `SLA overrides not loaded.*corrupt state file`, time.Second)
	start := time.Now()
	for time.Since(start) < 5*time.Second {
		if q := readQuota(t, cpuDir); q != 70000 {
			t.Fatalf("the agent changed the VM's quota to %d after %v", q, time.Since(start))
		}
		time.Sleep(100 * time.Millisecond)
	}
	for _, r := range a2.audit(t) {
		if r.Result == string(executor.Applied) {
			t.Fatalf("a VM was touched after the restart on corrupt state: %+v", r)
		}
	}
	if m, _ := filepath.Glob(filepath.Join(state, "drm.db.corrupt-*")); len(m) != 1 {
		t.Fatalf("corrupt journal not kept aside: %v", m)
	}
}

// TestRestartKeepsLimitsAndTelemetry: an agent restarted with the VM
// running changes no limit, leaves QEMU alone, and its eBPF counters for
// the vCPU threads carry on — they even grew while no agent ran, since
// the pinned programs stayed attached.
func TestRestartKeepsLimitsAndTelemetry(t *testing.T) {
	testutil.RequireBTF(t)
	cpuDir := busyVM(t)
	v := guest.Get(t)
	tids := vcpuTIDs(t, v)
	p := newPair(t, 700)
	a := p.start("a")
	a.waitLog(t, `active: lease acquired" epoch=1`, 20*time.Second)
	waitQuota(t, cpuDir, 20*time.Second, "busy VM at its ceiling", func(q int64) bool { return q == 70000 })
	// The test reads the same pinned maps (re-using, not adding, links).
	r, err := telemetry.LoadRunqlatPinned(p.pinDir)
	if err != nil {
		t.Fatalf("%+v", err)
	}
	defer r.Close()
	onCPU := func() uint64 {
		st, err := r.Read()
		if err != nil {
			t.Fatal(err)
		}
		var n uint64
		for _, tid := range tids {
			n += st[tid].OnCPUNs
		}
		return n
	}
	v.SetLoad(t.Context(), vmLoad(30))
	before := onCPU()
	if before == 0 {
		t.Fatal("the agent's pinned run-queue map has no time for the vCPU threads")
	}
	a.stop(10 * time.Second)
	stopped := time.Now()
	time.Sleep(time.Second)
	during := onCPU()
	a2 := p.start("a")
	a2.waitLog(t, `active: lease acquired" epoch=2`, 20*time.Second)
	start := time.Now()
	for time.Since(start) < 5*time.Second {
		if q := readQuota(t, cpuDir); q != 70000 {
			t.Fatalf("restarted agent changed the quota to %d after %v", q, time.Since(start))
		}
		time.Sleep(100 * time.Millisecond)
	}
	after := onCPU()
	t.Logf("vCPU on-CPU ns in the pinned map: %d while the first agent ran, %d with no agent, %d after the restart", before, during, after)
	if !(before < during && during < after) {
		t.Fatalf("telemetry not continuous: %d, %d, %d", before, during, after)
	}
	for _, rec := range a2.audit(t) { // the same state directory: one chain
		if rec.Result == string(executor.Applied) && rec.Time.After(stopped) {
			t.Fatalf("restart changed a limit: %+v", rec)
		}
	}
	if err := syscall.Kill(v.PID, 0); err != nil {
		t.Fatalf("QEMU gone after the restart: %v", err)
	}
}

// BenchmarkFailover: kill -9 of the active → first action of the new
// active, over 20 kills (a fresh standby is started after each). Reports
// p50, p95 and max in ms.
func BenchmarkFailover(b *testing.B) {
	testutil.RequireBTF(b)
	cpuDir := busyVM(b)
	p := newPair(b, 700)
	const kills = 20
	var took []time.Duration
	for i := 0; i < b.N; i++ {
		active := p.start(fmt.Sprintf("a%d", i))
		active.waitLog(b, `active: lease acquired`, 20*time.Second)
		waitQuota(b, cpuDir, 20*time.Second, "busy VM at its ceiling", func(q int64) bool { return q == 70000 })
		for k := 0; k < kills; k++ {
			standby := p.start(fmt.Sprintf("s%d-%d", i, k))
			standby.waitLog(b, `standby: following the active`, 20*time.Second)
			time.Sleep(300 * time.Millisecond) // the standby is polling
			killed := time.Now()
			active.kill()
			writeQuota(b, cpuDir, 35000)
			waitQuota(b, cpuDir, 10*time.Second, "new active acted", func(q int64) bool { return q == 70000 })
			took = append(took, time.Since(killed))
			active = standby
		}
		active.stop(5 * time.Second)
	}
	sort.Slice(took, func(i, j int) bool { return took[i] < took[j] })
	q := func(f float64) time.Duration { return took[int(f*float64(len(took)-1)+0.5)] }
	b.ReportMetric(float64(q(0.5).Milliseconds()), "p50-ms")
	b.ReportMetric(float64(q(0.95).Milliseconds()), "p95-ms")
	b.ReportMetric(float64(took[len(took)-1].Milliseconds()), "max-ms")
	b.Logf("failover over %d kills: p50 %v p95 %v max %v", len(took), q(0.5), q(0.95), took[len(took)-1])
}
