package e2e

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ars-dev/ars/agent/cgroups"
	"github.com/ars-dev/ars/internal/testutil"
)

// arsdProc is a running arsd started by a test.
type arsdProc struct {
	cmd    *exec.Cmd
	log    *bytes.Buffer
	exited chan error
}

// startArsd runs arsd with args; it is stopped in t.Cleanup.
func startArsd(t testing.TB, bin string, args ...string) *arsdProc {
	t.Helper()
	if !slices.Contains(args, "--bpf-pin-dir") {
		// Tests do not pin into the host's /sys/fs/bpf/ars (failover tests
		// pin into a private bpffs of their own).
		args = append(args, "--bpf-pin-dir", "off")
	}
	p := &arsdProc{cmd: exec.Command(bin, args...), log: &bytes.Buffer{}, exited: make(chan error, 1)}
	p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.exited <- p.cmd.Wait() }()
	t.Cleanup(func() {
		p.stop()
		if t.Failed() {
			t.Logf("arsd log:\n%s", p.log.String())
		}
	})
	return p
}

// stop sends SIGTERM and waits (SIGKILL after 10 s); idempotent.
func (p *arsdProc) stop() {
	if p.cmd.ProcessState != nil {
		return
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-p.exited:
		p.exited <- err
	case <-time.After(10 * time.Second):
		p.cmd.Process.Kill()
	}
}

// TestArsdRepairsDriftAndSurvivesRestart: a quota changed behind ARS's
// back is put back within a tick or two and audited; a restarted arsd
// adopts the limits in place and changes no VM's limit.
func TestArsdRepairsDriftAndSurvivesRestart(t *testing.T) {
	testutil.RequireBTF(t)
	v := guest.Get(t)
	cpuDir := v.Cgroup.Dirs["cpu"]
	t.Cleanup(func() { cgroups.WriteFile(filepath.Join(cpuDir, "cpu.cfs_quota_us"), "-1") })
	work := t.TempDir()
	arsd := build(t, "./cmd/arsd", work)
	// A ceiling below the busy guest's demand pins its quota there.
	cfg := filepath.Join(work, "ars.yaml")
	os.WriteFile(cfg, []byte("vms:\n  e2e:\n    cpu: {floorMillicores: 200, ceilingMillicores: 700}\n"), 0o600)
	args := []string{"--config", cfg, "--qmp-dir", qmpDir, "--control-socket", filepath.Join(work, "arsd.sock"),
		"--metrics-addr", "off", "--state-dir", filepath.Join(work, "state")}
	setLoad(t, v, 100)
	t.Cleanup(func() { setLoad(t, v, 0) })
	p := startArsd(t, arsd, args...)
	waitQuota(t, cpuDir, 20*time.Second, "busy VM at its 700m ceiling", func(q int64) bool { return q == 70000 })

	// Drift: someone halves the quota; arsd puts it back.
	if err := cgroups.WriteFile(filepath.Join(cpuDir, "cpu.cfs_quota_us"), "35000"); err != nil {
		t.Fatal(err)
	}
	_, took := waitQuota(t, cpuDir, 3*time.Second, "drift repaired", func(q int64) bool { return q == 70000 })
	t.Logf("drift repaired after %v", took)
	p.stop()
	audit, err := os.ReadFile(filepath.Join(work, "state", "audit.log"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(audit), `"kind":"drift.cpu.quota"`) || !strings.Contains(string(audit), `"after":"35000"`) {
		t.Fatalf("drift not audited:\n%s", audit)
	}

	// Restart with the guest now idle: an arsd without memory of the past
	// would shrink the quota at once; it adopts the limit in place while
	// its model warms up, so for 8 s (many decisions) nothing changes.
	setLoad(t, v, 0)
	time.Sleep(time.Second)
	startArsd(t, arsd, args...)
	start := time.Now()
	for time.Since(start) < 8*time.Second {
		if q := readQuota(t, cpuDir); q != 70000 {
			t.Fatalf("restarted arsd changed the quota to %d after %v", q, time.Since(start))
		}
		time.Sleep(100 * time.Millisecond)
	}
	// The restarted agent's DRM is restored from the host: the VM's row
	// holds the quota in force.
	arsctl := build(t, "./cmd/arsctl", work)
	drm := drmOf(t, arsctl, filepath.Join(work, "arsd.sock"), "e2e")
	if len(drm.VMs) != 1 || drm.VMs[0].CPU.QuotaUs != 70000 || len(drm.VMs[0].VCPUs) == 0 {
		t.Fatalf("DRM after restart: %+v", drm)
	}
}
