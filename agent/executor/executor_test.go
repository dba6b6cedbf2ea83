package executor

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/ars-dev/ars/agent/actuator/cgroup"
	"github.com/ars-dev/ars/agent/cgroups"
	"github.com/ars-dev/ars/internal/testutil"
)

// fakeCG records writes; quota per cgroup dir.
type fakeCG struct {
	quota  map[string]int64
	writes int
	err    error
}

func (f *fakeCG) ReadQuota(g cgroups.Group) (int64, uint64, error) {
	if f.err != nil {
		return 0, 0, f.err
	}
	q, ok := f.quota[g.CPU]
	if !ok {
		return 0, 0, fs.ErrNotExist
	}
	return q, 100000, nil
}

func (f *fakeCG) WriteQuota(g cgroups.Group, q int64) error {
	f.writes++
	f.quota[g.CPU] = q
	return nil
}

func readAudit(t *testing.T, path string) []Record {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var recs []Record
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var r Record
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatalf("audit line %q: %v", sc.Text(), err)
		}
		recs = append(recs, r)
	}
	return recs
}

func TestApplyWritesOnlyChanges(t *testing.T) {
	dir := t.TempDir()
	audit, err := OpenAudit(filepath.Join(dir, "audit.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer audit.Close()
	cg := &fakeCG{quota: map[string]int64{"/a": -1, "/b": 50000}}
	now := func() time.Time { return time.Unix(100, 0) }
	ex := New(Actuators{CPU: cg}, audit, false, now, "test")
	res := ex.Apply(context.Background(), []Action{
		{VM: "a", Kind: KindCPUQuota, Group: cgroups.Group{CPU: "/a"}, Millicores: 250, Reason: "grow"},
		{VM: "b", Kind: KindCPUQuota, Group: cgroups.Group{CPU: "/b"}, Millicores: 500, Reason: "same"},
		{VM: "gone", Kind: KindCPUQuota, Group: cgroups.Group{CPU: "/gone"}, Millicores: 500},
		{VM: "a", Kind: KindCPUQuota, Group: cgroups.Group{CPU: "/a"}, Millicores: 0},
		{VM: "a", Kind: "bogus", Group: cgroups.Group{CPU: "/a"}, Millicores: 10},
	})
	want := []Outcome{Applied, Unchanged, Vanished, Failed, Failed}
	for i, r := range res {
		if r.Outcome != want[i] {
			t.Errorf("action %d: outcome %s (%v), want %s", i, r.Outcome, r.Err, want[i])
		}
	}
	if cg.quota["/a"] != 25000 || cg.writes != 1 {
		t.Fatalf("quota /a = %d after %d writes, want 25000 after 1", cg.quota["/a"], cg.writes)
	}
	recs := readAudit(t, filepath.Join(dir, "audit.log"))
	if len(recs) != 1 || recs[0].VM != "a" || recs[0].Before != "-1" || recs[0].After != "25000" || recs[0].Reason != "grow" ||
		recs[0].Result != "applied" || recs[0].Actor != "test" || recs[0].Seq != 1 || recs[0].Prev != GenesisHash {
		t.Fatalf("audit = %+v", recs)
	}
	st, _ := os.Stat(filepath.Join(dir, "audit.log"))
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("audit mode %v", st.Mode())
	}
}

func TestDryRunWritesNothing(t *testing.T) {
	cg := &fakeCG{quota: map[string]int64{"/a": -1}}
	ex := New(Actuators{CPU: cg}, nil, true, time.Now, "test")
	r := ex.Apply(context.Background(), []Action{{VM: "a", Kind: KindCPUQuota, Group: cgroups.Group{CPU: "/a"}, Millicores: 300}})
	if r[0].Outcome != DryRun || cg.writes != 0 || r[0].After != "30000" {
		t.Fatalf("dry run: %+v writes=%d", r[0], cg.writes)
	}
}

func TestApplyReadError(t *testing.T) {
	cg := &fakeCG{err: errors.New("EIO")}
	ex := New(Actuators{CPU: cg}, nil, false, time.Now, "test")
	r := ex.Apply(context.Background(), []Action{{VM: "a", Kind: KindCPUQuota, Millicores: 300}})
	if r[0].Outcome != Failed || r[0].Err == nil {
		t.Fatalf("got %+v", r[0])
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	r = ex.Apply(ctx, []Action{{VM: "a", Kind: KindCPUQuota, Millicores: 300}})
	if r[0].Outcome != Failed || !errors.Is(r[0].Err, context.Canceled) {
		t.Fatalf("cancelled: %+v", r[0])
	}
}

func TestQuotaFor(t *testing.T) {
	for _, c := range []struct {
		m    int64
		p    uint64
		want int64
	}{{1000, 100000, 100000}, {250, 100000, 25000}, {5, 100000, 1000}, {1500, 50000, 75000}} {
		if got := QuotaFor(c.m, c.p); got != c.want {
			t.Errorf("QuotaFor(%d,%d) = %d, want %d", c.m, c.p, got, c.want)
		}
	}
}

// TestRealCgroupQuota writes a real cgroup under the test's own cgroup and
// checks the kernel's file, not the executor's report.
func TestRealCgroupQuota(t *testing.T) {
	testutil.RequirePrivileged(t)
	host, err := cgroups.Detect(cgroups.DefaultPaths())
	if err != nil {
		t.Fatal(err)
	}
	own, err := host.CreateUnderSelf("ars-exec-test-"+filepath.Base(t.TempDir()), "cpu", "cpuacct")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := own.Remove(); err != nil {
			t.Error(err)
		}
	})
	g, err := own.Group()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	audit, err := OpenAudit(filepath.Join(dir, "audit.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer audit.Close()
	ex := New(Actuators{CPU: CgroupActuator{W: cgroup.New(cgroup.Paths{Sys: "/sys"}), Host: host}}, audit, false, time.Now, "test")
	r := ex.Apply(context.Background(), []Action{{VM: "t", Kind: KindCPUQuota, Group: g, Millicores: 350, Reason: "test"}})
	if r[0].Outcome != Applied {
		t.Fatalf("apply: %+v", r[0])
	}
	q, p, err := cgroups.ReadQuota(g)
	if err != nil {
		t.Fatal(err)
	}
	if q != QuotaFor(350, p) {
		t.Fatalf("kernel quota %d, want %d (period %d)", q, QuotaFor(350, p), p)
	}
	r = ex.Apply(context.Background(), []Action{{VM: "t", Kind: KindCPUQuota, Group: g, Millicores: 350}})
	if r[0].Outcome != Unchanged {
		t.Fatalf("second apply: %+v", r[0])
	}
	if n := len(readAudit(t, filepath.Join(dir, "audit.log"))); n != 1 {
		t.Fatalf("%d audit records, want 1", n)
	}
}

// TestRealVanishedCgroup: a VM whose cgroup is gone is "vanished", not a failure.
func TestRealVanishedCgroup(t *testing.T) {
	testutil.RequirePrivileged(t)
	host, err := cgroups.Detect(cgroups.DefaultPaths())
	if err != nil {
		t.Fatal(err)
	}
	own, err := host.CreateUnderSelf("ars-exec-gone-"+filepath.Base(t.TempDir()), "cpu", "cpuacct")
	if err != nil {
		t.Fatal(err)
	}
	g, err := own.Group()
	if err != nil {
		t.Fatal(err)
	}
	if err := own.Remove(); err != nil {
		t.Fatal(err)
	}
	ex := New(Actuators{CPU: CgroupActuator{W: cgroup.New(cgroup.Paths{Sys: "/sys"}), Host: host}}, nil, false, time.Now, "test")
	r := ex.Apply(context.Background(), []Action{{VM: "gone", Kind: KindCPUQuota, Group: g, Millicores: 300}})
	if r[0].Outcome != Vanished || r[0].Err != nil {
		t.Fatalf("vanished cgroup: %+v", r[0])
	}
}
