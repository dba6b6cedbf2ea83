package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ars-dev/ars/agent/cgroups"
	"github.com/ars-dev/ars/internal/testutil"
	"github.com/ars-dev/ars/internal/vm"
	"github.com/ars-dev/ars/internal/vmtest"
	"github.com/ars-dev/ars/mapper"
)

// floorWatch polls a cgroup's quota every 50 ms in the background and
// records the lowest positive value seen, so a test can assert that a
// limit never went below a floor at any moment, not just when it looked.
type floorWatch struct {
	min  atomic.Int64
	stop chan struct{}
	wg   sync.WaitGroup
}

func watchMinQuota(t *testing.T, dir string) *floorWatch {
	w := &floorWatch{stop: make(chan struct{})}
	w.min.Store(1 << 62)
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		for {
			select {
			case <-w.stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
			b, err := os.ReadFile(filepath.Join(dir, "cpu.cfs_quota_us"))
			if err != nil {
				continue
			}
			q, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
			if err == nil && q > 0 && q < w.min.Load() {
				w.min.Store(q)
			}
		}
	}()
	t.Cleanup(w.close)
	return w
}

func (w *floorWatch) close() {
	select {
	case <-w.stop:
	default:
		close(w.stop)
	}
	w.wg.Wait()
}

func drmOf(t *testing.T, arsctl, sock, vmName string) mapper.Snapshot {
	t.Helper()
	s, err := tryDRM(arsctl, sock, vmName)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// tryDRM runs `arsctl drm --vm NAME --json`.
func tryDRM(arsctl, sock, vmName string) (mapper.Snapshot, error) {
	var s mapper.Snapshot
	out, err := exec.Command(arsctl, "--socket", sock, "--json", "--vm", vmName, "drm").CombinedOutput()
	if err != nil {
		return s, fmt.Errorf("arsctl drm: %v\n%s", err, out)
	}
	if err := json.Unmarshal(out, &s); err != nil {
		return s, fmt.Errorf("arsctl drm --json: %v\n%s", err, out)
	}
	return s, nil
}

func scrape(t *testing.T, addr string) string {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// waitFor polls cond every 200 ms until it holds or limit passes.
func waitFor(t *testing.T, limit time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > limit {
			t.Fatalf("%s: not within %v", what, limit)
		}
		time.Sleep(200 * time.Millisecond)
	}
	return time.Since(start)
}

// TestArsdBorrowsThrottlesAndReturns (issue 6, real-VM tests 2 and 3): two
// TCG VMs on a host whose capacity the config sets to 1,200 m. The
// best-effort VM "lo" is busy and holds most of it; when the critical VM
// "e2e" ramps up it borrows from "lo", whose quota drops but never below
// its 300 m floor (watched every 50 ms); the loan shows in `arsctl drm`
// and the audit log. When "e2e" wants more than borrowing can give, it is
// throttled and ars_vm_throttled fires. When "e2e" goes idle, the loan is
// returned to "lo".
func TestArsdBorrowsThrottlesAndReturns(t *testing.T) {
	testutil.RequireBTF(t)
	hi := guest.Get(t)
	lo := vmtest.Start(t, vm.Config{Name: "lo", VCPUs: 1, MemMiB: 128, QMPSocket: filepath.Join(qmpDir, "lo.sock")})
	t.Cleanup(func() { os.Remove(filepath.Join(qmpDir, "lo.sock")) })
	hiDir, loDir := hi.Cgroup.Dirs["cpu"], lo.Cgroup.Dirs["cpu"]
	t.Cleanup(func() { cgroups.WriteFile(filepath.Join(hiDir, "cpu.cfs_quota_us"), "-1") })
	setLoad(t, hi, 0)
	t.Cleanup(func() { setLoad(t, hi, 0) })
	setLoad(t, lo, 100)

	work := t.TempDir()
	arsd, arsctl := build(t, "./cmd/arsd", work), build(t, "./cmd/arsctl", work)
	cfg := filepath.Join(work, "ars.yaml")
	os.WriteFile(cfg, []byte(`capacity:
  cpuMillicores: {total: 1200}
synthesizer: {stepMillicores: 10, shrinkThreshold: 0.1, minDwell: 2s, growHeadroom: 0.05}
vms:
  e2e: {cpu: {floorMillicores: 200, ceilingMillicores: 1000}, class: critical}
  lo:  {cpu: {floorMillicores: 300, ceilingMillicores: 1000}, class: best-effort}
`), 0o600)
	sock, metricsAddr, state := filepath.Join(work, "arsd.sock"), freePort(t), filepath.Join(work, "state")
	startArsd(t, arsd, "--config", cfg, "--qmp-dir", qmpDir, "--control-socket", sock,
		"--metrics-addr", metricsAddr, "--state-dir", state)

	// "lo" busy, "e2e" idle: "lo" takes what the host has beside e2e's floor.
	waitQuota(t, loDir, 30*time.Second, "busy lo near its ceiling", func(q int64) bool { return q >= 80000 })
	minLo := watchMinQuota(t, loDir)

	// "e2e" ramps up to half a core: it borrows from "lo".
	setLoad(t, hi, 50)
	took := waitFor(t, 30*time.Second, "loan from lo to e2e in arsctl drm", func() bool {
		for _, l := range drmOf(t, arsctl, sock, "e2e").Loans {
			if l.Lender == "lo" && l.Borrower == "e2e" && l.Resource == "cpu" && l.Amount > 0 {
				return true
			}
		}
		return false
	})
	t.Logf("loan visible after %v: e2e quota %d, lo quota %d", took.Round(time.Millisecond), readQuota(t, hiDir), readQuota(t, loDir))
	if q := readQuota(t, hiDir) + readQuota(t, loDir); q > 120000 {
		t.Fatalf("quotas sum to %d µs per 100 ms, above the 1,200 m capacity", q)
	}

	// "e2e" wants a whole core (and more, with QEMU's own threads): the
	// host has 1,200 m and "lo" keeps its 300 m floor, so "e2e" is throttled.
	setLoad(t, hi, 100)
	waitFor(t, 40*time.Second, "ars_vm_throttled{vm=e2e} = 1", func() bool {
		return strings.Contains(scrape(t, metricsAddr), `ars_vm_throttled{resource="cpu",vm="e2e"} 1`)
	})
	if q := readQuota(t, loDir); q != 30000 {
		t.Fatalf("lo's quota %d while e2e is throttled, want its floor 30000", q)
	}

	// "e2e" idle again: the loan goes back to "lo", which is still busy.
	setLoad(t, hi, 0)
	took = waitFor(t, 60*time.Second, "loan returned", func() bool { return len(drmOf(t, arsctl, sock, "lo").Loans) == 0 })
	waitQuota(t, loDir, 30*time.Second, "lo back near its ceiling", func(q int64) bool { return q >= 80000 })
	t.Logf("loan returned after %v", took.Round(time.Millisecond))
	minLo.close()
	if m := minLo.min.Load(); m < 30000 {
		t.Fatalf("lo's quota went down to %d, below its 300 m floor", m)
	}
	t.Logf("lowest quota of lo seen (every 50 ms): %d µs", minLo.min.Load())
	setLoad(t, lo, 0)

	audit, err := os.ReadFile(filepath.Join(state, "audit.log"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"kind":"loan.cpu"`, `"result":"returned"`, `"kind":"throttle.cpu"`} {
		if !strings.Contains(string(audit), want) {
			t.Errorf("audit log lacks %s", want)
		}
	}
	out, err := exec.Command(arsctl, "audit", "verify", "--log", filepath.Join(state, "audit.log")).CombinedOutput()
	if err != nil {
		t.Fatalf("audit verify: %v\n%s", err, out)
	}
}

// TestArsdBalloonsMemory (issue 6, real-VM test 6): with a memory SLA that
// allows topology changes, arsd deflates nothing and inflates the balloon
// of an idle 192 MiB guest (the guest kernel's own MemAvailable drops),
// then gives the memory back as the guest's workload allocates more, and
// the guest is never OOM-killed (its workload keeps answering with the
// memory it was asked to hold).
func TestArsdBalloonsMemory(t *testing.T) {
	testutil.RequireBTF(t)
	v := guest.Get(t)
	setLoad(t, v, 0)
	t.Cleanup(func() { setLoad(t, v, 0) })
	cpuDir := v.Cgroup.Dirs["cpu"]
	t.Cleanup(func() { cgroups.WriteFile(filepath.Join(cpuDir, "cpu.cfs_quota_us"), "-1") })
	// Give the guest its memory back whatever happens (the shared guest
	// serves later tests); arsd is stopped by then (cleanups run LIFO).
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		v.QMP(ctx, "balloon", map[string]any{"value": 192 << 20})
	})
	ctx := context.Background()
	st, err := v.Status(ctx)
	if err != nil || st.MemAvailMiB <= 0 {
		t.Fatalf("guest status %+v %v (guest too old? make guest)", st, err)
	}
	before := st.MemAvailMiB

	work := t.TempDir()
	arsd, arsctl := build(t, "./cmd/arsd", work), build(t, "./cmd/arsctl", work)
	cfg := filepath.Join(work, "ars.yaml")
	// The plain EWMA model (margin 25 %): this test is about the balloon
	// path, not the calibrated model's warm-up, whose margin is wide for
	// its first 50 samples.
	os.WriteFile(cfg, []byte(`predictor: {model: ewma, alpha: 0.5, margin: 0.25}
vms:
  e2e:
    cpu: {floorMillicores: 200, ceilingMillicores: 1500}
    memory: {floorMiB: 64, ceilingMiB: 192}
    allowTopologyChanges: true
`), 0o600)
	sock := filepath.Join(work, "arsd.sock")
	startArsd(t, arsd, "--config", cfg, "--qmp-dir", qmpDir, "--control-socket", sock,
		"--metrics-addr", "off", "--state-dir", filepath.Join(work, "state"))

	memRow := func() mapper.Mem {
		s, err := tryDRM(arsctl, sock, "e2e") // arsd may still be starting
		if err != nil || len(s.VMs) == 0 || s.VMs[0].Mem == nil {
			return mapper.Mem{}
		}
		return *s.VMs[0].Mem
	}
	// Idle: the balloon inflates (the guest shrinks) by at least two
	// 16 MiB steps.
	var shrunk mapper.Mem
	took := waitFor(t, 40*time.Second, "idle guest ballooned to 160 MiB or less", func() bool {
		shrunk = memRow()
		return shrunk.BalloonMiB > 0 && shrunk.BalloonMiB <= 160
	})
	st, err = v.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("idle: balloon %d MiB (target %d, guest uses %d) after %v; guest MemAvailable %d → %d MiB",
		shrunk.BalloonMiB, shrunk.TargetMiB, shrunk.UsedMiB, took.Round(time.Millisecond), before, st.MemAvailMiB)
	if drop := before - st.MemAvailMiB; drop < (192-int(shrunk.BalloonMiB))/2 {
		t.Fatalf("guest's own MemAvailable dropped by %d MiB only, balloon says %d MiB taken", drop, 192-shrunk.BalloonMiB)
	}

	// Demand rises: the workload holds what the guest can give now, then
	// more as arsd deflates the balloon, up to 72 MiB (a 192 MiB guest
	// counts about 140 MiB; it uses about 25 idle).
	const hold = 72
	want := 0
	took = waitFor(t, 60*time.Second, "workload holding 72 MiB", func() bool {
		st, err := v.Status(ctx)
		if err != nil {
			t.Fatalf("guest stopped answering (OOM?): %v", err)
		}
		if st.MemMiB >= hold {
			return true
		}
		next := min(hold, max(want, st.MemMiB)+max(0, min(16, st.MemAvailMiB-24)))
		if next > st.MemMiB {
			if err := v.SetLoad(ctx, vm.Load{MemMiB: next}); err == nil {
				want = next
			} else {
				t.Logf("mem=%d: %v (available %d MiB)", next, err, st.MemAvailMiB)
			}
		}
		return false
	})
	var grown mapper.Mem
	waitFor(t, 20*time.Second, "balloon deflated above its idle size", func() bool {
		grown = memRow()
		return grown.BalloonMiB > shrunk.BalloonMiB
	})
	t.Logf("busy: workload holds %d MiB after %v; balloon %d MiB (target %d, guest uses %d)",
		hold, took.Round(time.Millisecond), grown.BalloonMiB, grown.TargetMiB, grown.UsedMiB)
	if st, err := v.Status(ctx); err != nil || st.MemMiB != hold {
		t.Fatalf("guest workload after growth: %+v %v", st, err)
	}
}
