package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ars-dev/ars/agent/caps"
	"github.com/ars-dev/ars/agent/status"
	"github.com/ars-dev/ars/internal/testutil"
	"github.com/ars-dev/ars/ipc"
)

// testArsd is arsd run by this test binary (TestMain, arsdEnv) in its own
// directory, stopped by t.Cleanup.
type testArsd struct {
	cmd     *exec.Cmd
	sock    string
	state   string
	logPath string
	exited  chan error
}

// startArsd starts arsd under wrapper (a command line ending where arsd's
// path goes, or nil) with a control socket, state and QMP directory under
// top, no metrics, no eBPF, dry-run, plus extra flags.
func startArsd(t *testing.T, top string, wrapper []string, extra ...string) *testArsd {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	a := &testArsd{sock: filepath.Join(top, "run", "arsd.sock"), state: filepath.Join(top, "state"),
		logPath: filepath.Join(top, "arsd.log"), exited: make(chan error, 1)}
	logf, err := os.Create(a.logPath)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { logf.Close() })
	args := append(append([]string(nil), wrapper...), self,
		"--qmp-dir", filepath.Join(top, "qmp"), "--control-socket", a.sock, "--state-dir", a.state,
		"--metrics-addr", "off", "--no-bpf", "--dry-run", "--bpf-pin-dir", "off")
	a.cmd = exec.Command(args[0], append(args[1:], extra...)...)
	a.cmd.Env = append(os.Environ(), arsdEnv+"=1")
	a.cmd.Stdout, a.cmd.Stderr = logf, logf
	if err := a.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { a.exited <- a.cmd.Wait() }()
	t.Cleanup(func() {
		a.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-a.exited:
		case <-time.After(15 * time.Second):
			a.cmd.Process.Kill()
			<-a.exited
		}
	})
	return a
}

func (a *testArsd) log() string { b, _ := os.ReadFile(a.logPath); return string(b) }

// waitTick waits for a status with a tick, as root through the socket.
func (a *testArsd) waitTick(t *testing.T) status.Snapshot {
	t.Helper()
	var snap status.Snapshot
	deadline := time.Now().Add(45 * time.Second)
	for {
		select {
		case err := <-a.exited:
			t.Fatalf("arsd exited: %v\n%s", err, a.log())
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		err := ipc.Call(ctx, a.sock, "status", nil, &snap)
		cancel()
		if err == nil && snap.Tick > 0 {
			return snap
		}
		if time.Now().After(deadline) {
			t.Fatalf("no status with a tick from arsd: %v\n%s", err, a.log())
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestArsdWithoutNetAdmin starts arsd under `capsh --drop=cap_net_admin`:
// it must run, with network shaping off, and say so in its log and in its
// status.
func TestArsdWithoutNetAdmin(t *testing.T) {
	testutil.RequirePrivileged(t)
	capsh := testutil.RequireCommand(t, "capsh")
	// capsh execs bash, which execs arsd: the pid is arsd's.
	a := startArsd(t, t.TempDir(), []string{capsh, "--drop=cap_net_admin", "--", "-c", `exec "$0" "$@"`})
	snap := a.waitTick(t)
	st, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(a.cmd.Process.Pid), "status"))
	if err != nil {
		t.Fatal(err)
	}
	eff := capEff(t, string(st))
	if eff.Has(caps.NetAdmin) || !eff.Has(caps.SysAdmin) {
		t.Fatalf("arsd ran with effective set %s; want all but CAP_NET_ADMIN", eff)
	}
	const want = "network shaping (tc) off: no CAP_NET_ADMIN"
	if !strings.Contains(snap.Telemetry, want) {
		t.Errorf("status telemetry %q does not say %q", snap.Telemetry, want)
	}
	if logText := a.log(); !strings.Contains(logText, `msg="feature off" feature="network shaping (tc)" needs=CAP_NET_ADMIN`) {
		t.Errorf("log does not say network shaping is off:\n%s", logText)
	}
	t.Logf("status telemetry: %s", snap.Telemetry)
}

func capEff(t *testing.T, status string) caps.Set {
	t.Helper()
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "self"), 0o755)
	os.WriteFile(filepath.Join(dir, "self", "status"), []byte(status), 0o644)
	p, err := caps.Read(dir)
	if err != nil {
		t.Fatal(err)
	}
	return p.Effective
}
