package agent

import (
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/ars-dev/ars/agent/discovery"
	"github.com/ars-dev/ars/agent/executor"
	"github.com/ars-dev/ars/agent/qmp/qmptest"
	"github.com/ars-dev/ars/internal/testutil"
)

// TestQMPControlsOnDiscoveredVM: the executor's QMP resolver builds a
// controller on the monitor discovery holds, against a real QEMU, and
// reports a VM that went away as vanished.
func TestQMPControlsOnDiscoveredVM(t *testing.T) {
	testutil.RequirePrivileged(t)
	dir := t.TempDir()
	q := qmptest.StartQEMU(t, filepath.Join(dir, "vm1.sock"), "1,maxcpus=2")
	w := discovery.NewWatcher(dir, nil, discovery.Options{})
	t.Cleanup(func() { w.Close() })
	if ch := w.Refresh(context.Background()); len(ch.Added) != 1 {
		t.Fatalf("discovered %+v", ch)
	}
	qc := &QMPControls{W: w}
	c, err := qc.Get("vm1")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	slots, err := c.HotplugCPUs(ctx)
	if err != nil || len(slots) != 2 {
		t.Fatalf("hotplug slots %+v %v", slots, err)
	}
	if c2, _ := qc.Get("vm1"); c2 != c {
		t.Fatal("controller not reused for the same monitor")
	}
	if _, err := qc.Get("nope"); !errors.Is(err, executor.ErrVanished) {
		t.Fatalf("unknown VM: %v", err)
	}
	q.Kill()
	w.Refresh(context.Background())
	if _, err := qc.Get("vm1"); !errors.Is(err, executor.ErrVanished) {
		t.Fatalf("after QEMU exit: %v", err)
	}
}
