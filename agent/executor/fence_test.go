package executor

import (
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/ars-dev/ars/agent/cgroups"
)

// TestFenceRefusesWriteOfSupersededLeader: the fence is asked before each
// write; once it reports a newer epoch, the write is refused as stale,
// audited, and the executor's epoch is raised so later plans are refused
// up front.
func TestFenceRefusesWriteOfSupersededLeader(t *testing.T) {
	dir := t.TempDir()
	audit, err := OpenAudit(filepath.Join(dir, "audit.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer audit.Close()
	cg := &fakeCG{quota: map[string]int64{"/a": -1, "/b": -1}}
	superseded := false
	calls := 0
	ex := New(Actuators{CPU: cg}, audit, false, time.Now, "test").WithFence(func(context.Context) (uint64, error) {
		calls++
		if superseded {
			return 5, errors.New("lease: epoch 4 superseded by epoch 5")
		}
		return 0, nil
	})
	ex.SetEpoch(4)
	act := func(vm string, mc int64) Action {
		return Action{VM: vm, Kind: KindCPUQuota, Group: cgroups.Group{CPU: "/" + vm}, Millicores: mc, Epoch: 4}
	}
	if r := ex.Apply(context.Background(), []Action{act("a", 300)}); r[0].Outcome != Applied || calls != 1 {
		t.Fatalf("leader's write: %+v (fence calls %d)", r, calls)
	}
	superseded = true
	r := ex.Apply(context.Background(), []Action{act("b", 300)})
	if r[0].Outcome != Stale || r[0].Err == nil || cg.quota["/b"] != -1 {
		t.Fatalf("superseded write: %+v quota %d", r, cg.quota["/b"])
	}
	if ex.Epoch() != 5 {
		t.Fatalf("epoch %d, want raised to 5", ex.Epoch())
	}
	calls = 0
	if r := ex.Apply(context.Background(), []Action{act("a", 400)}); r[0].Outcome != Stale || calls != 0 {
		t.Fatalf("later plan of the old epoch: %+v (fence calls %d)", r, calls)
	}
	recs := readAudit(t, filepath.Join(dir, "audit.log"))
	if len(recs) != 3 || recs[1].Result != "stale_epoch" || recs[2].Result != "stale_epoch" {
		t.Fatalf("audit %+v", recs)
	}
}
