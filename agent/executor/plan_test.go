package executor

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ars-dev/ars/agent/actuator/qmpact"
	"github.com/ars-dev/ars/agent/actuator/tc"
	"github.com/ars-dev/ars/agent/cgroups"
	"github.com/ars-dev/ars/mapper"
)

const mib = 1 << 20

// order records the global order of writes across fakes.
type orderCG struct {
	*fakeCG
	log *[]string
}

func (o orderCG) WriteQuota(g cgroups.Group, q int64) error {
	*o.log = append(*o.log, "quota "+g.CPU)
	return o.fakeCG.WriteQuota(g, q)
}

func TestPlanShrinksBeforeGrowsAcrossActuators(t *testing.T) {
	var log []string
	cg := orderCG{&fakeCG{quota: map[string]int64{"/donor": 100000, "/recv": 20000}}, &log}
	vm := map[string]*qmpact.Fake{
		"donor": qmpact.NewFake(256*mib, 1, 2, "disk0"),
		"recv":  qmpact.NewFake(256*mib, 1, 2, "disk0"),
	}
	vm["recv"].Balloon(context.Background(), 128*mib)
	shaper := &tc.Fake{}
	shaper.SetEgress(context.Background(), "tap-d", 20_000_000)
	ex := New(Actuators{CPU: cg, TC: shaper, QMP: func(name string) (qmpact.VMControl, error) {
		if f, ok := vm[name]; ok {
			return f, nil
		}
		return nil, ErrVanished
	}}, nil, false, time.Now, "test")
	plan := []Action{
		{VM: "recv", Kind: KindCPUQuota, Group: cgroups.Group{CPU: "/recv"}, Millicores: 900},   // grow
		{VM: "recv", Kind: KindBalloon, Bytes: 192 * mib},                                       // grow (deflate)
		{VM: "donor", Kind: KindCPUQuota, Group: cgroups.Group{CPU: "/donor"}, Millicores: 300}, // shrink
		{VM: "donor", Kind: KindBalloon, Bytes: 160 * mib},                                      // shrink (inflate)
		{VM: "donor", Kind: KindNetEgress, Link: "tap-d", BitsPerSec: 5_000_000},                // shrink
		{VM: "donor", Kind: KindBlockThrottle, Drive: "disk0", Throttle: qmpact.Throttle{BPS: 1 << 20}},
		{VM: "gone", Kind: KindBalloon, Bytes: 100 * mib},
		{VM: "recv", Kind: KindNetIngress, Link: "tap-r", BitsPerSec: 0},
	}
	res := ex.Apply(context.Background(), plan)
	want := []Outcome{Applied, Applied, Applied, Applied, Applied, Applied, Vanished, Failed}
	for i, r := range res {
		if r.Outcome != want[i] {
			t.Errorf("action %d (%s %s): %s %v, want %s", i, r.Action.VM, r.Action.Kind, r.Outcome, r.Err, want[i])
		}
	}
	// The donor's CPU shrink was written before the receiver's grow.
	if strings.Join(log, ",") != "quota /donor,quota /recv" {
		t.Fatalf("cgroup write order %v", log)
	}
	if a, _ := vm["donor"].BalloonActual(context.Background()); a != 160*mib {
		t.Fatalf("donor balloon %d", a)
	}
	if a, _ := vm["recv"].BalloonActual(context.Background()); a != 192*mib {
		t.Fatalf("receiver balloon %d", a)
	}
	if r, _ := shaper.Get(context.Background(), "tap-d"); r.EgressBitsPerSec != 5_000_000 {
		t.Fatalf("egress %d", r.EgressBitsPerSec)
	}
	if th, _ := vm["donor"].BlockThrottle(context.Background(), "disk0"); th.BPS != 1<<20 {
		t.Fatalf("throttle %+v", th)
	}
	// Unchanged on a second run: nothing written.
	writes := len(log)
	res = ex.Apply(context.Background(), plan[:6])
	for i, r := range res {
		if r.Outcome != Unchanged {
			t.Errorf("second run action %d: %s", i, r.Outcome)
		}
	}
	if len(log) != writes {
		t.Fatal("second run wrote to cgroups")
	}
}

// TestBalloonBeforeLimitOrdering: inside the shrink phase the balloon goes
// first (inflate before lowering limits); inside the grow phase it goes last.
func TestBalloonOrderWithinPhases(t *testing.T) {
	var order []string
	cg := orderCG{&fakeCG{quota: map[string]int64{"/a": 50000}}, &order}
	f := qmpact.NewFake(256*mib, 1, 2)
	rec := &recordingVM{Fake: f, log: &order}
	ex := New(Actuators{CPU: cg, QMP: func(string) (qmpact.VMControl, error) { return rec, nil }}, nil, false, time.Now, "t")
	ex.Apply(context.Background(), []Action{
		{VM: "a", Kind: KindCPUQuota, Group: cgroups.Group{CPU: "/a"}, Millicores: 100},
		{VM: "a", Kind: KindBalloon, Bytes: 128 * mib},
	})
	if strings.Join(order, ",") != "balloon,quota /a" {
		t.Fatalf("shrink order %v", order)
	}
	order = nil
	ex.Apply(context.Background(), []Action{
		{VM: "a", Kind: KindBalloon, Bytes: 256 * mib},
		{VM: "a", Kind: KindCPUQuota, Group: cgroups.Group{CPU: "/a"}, Millicores: 900},
	})
	if strings.Join(order, ",") != "quota /a,balloon" {
		t.Fatalf("grow order %v", order)
	}
}

type recordingVM struct {
	*qmpact.Fake
	log *[]string
}

func (r *recordingVM) Balloon(ctx context.Context, b uint64) error {
	*r.log = append(*r.log, "balloon")
	return r.Fake.Balloon(ctx, b)
}

func TestPlanValidatesBeforeWriting(t *testing.T) {
	f := qmpact.NewFake(256*mib, 1, 2, "disk0")
	ex := New(Actuators{QMP: func(string) (qmpact.VMControl, error) { return f, nil }}, nil, false, time.Now, "t")
	res := ex.Apply(context.Background(), []Action{
		{VM: "a", Kind: KindBlockThrottle, Drive: "disk0", Throttle: qmpact.Throttle{IOPS: -1}},
		{VM: "a", Kind: KindBalloon, Bytes: 0},
		{VM: "a", Kind: KindCPUQuota, Millicores: 100}, // no cgroup actuator
		{VM: "a", Kind: KindNetEgress, Link: "x", BitsPerSec: 1000},
	})
	for i, r := range res {
		if r.Outcome != Failed || r.Err == nil {
			t.Errorf("action %d: %s %v", i, r.Outcome, r.Err)
		}
	}
	for _, c := range f.Calls() {
		if c.Method == "Balloon" || c.Method == "SetBlockThrottle" {
			t.Fatalf("a refused action reached QMP: %+v", c)
		}
	}
}

// BenchmarkExecutorPlan1000VMs: executor overhead for a plan covering
// 1,000 VMs (a CPU quota, a balloon and an egress rate each), with fake
// actuators, a real audit log and a real bbolt journal on disk (intents
// and outcomes). Goal: ≤ 1 ms per VM.
func BenchmarkExecutorPlan1000VMs(b *testing.B) {
	const n = 1000
	cg := &fakeCG{quota: map[string]int64{}}
	vms := map[string]*qmpact.Fake{}
	shaper := &tc.Fake{}
	for i := 0; i < n; i++ {
		name := fmt.Sprintf("vm%04d", i)
		cg.quota["/"+name] = 50000
		vms[name] = qmpact.NewFake(256*mib, 1, 2)
	}
	audit, err := OpenAudit(filepath.Join(b.TempDir(), "audit.log"))
	if err != nil {
		b.Fatal(err)
	}
	defer audit.Close()
	jr, err := mapper.OpenJournal(filepath.Join(b.TempDir(), "drm.db"))
	if err != nil {
		b.Fatal(err)
	}
	defer jr.Close()
	ex := New(Actuators{CPU: cg, TC: shaper, QMP: func(vm string) (qmpact.VMControl, error) { return vms[vm], nil }},
		audit, false, time.Now, "bench").WithJournal(jr)
	plans := [2][]Action{}
	for k := range plans {
		for i := 0; i < n; i++ {
			name := fmt.Sprintf("vm%04d", i)
			plans[k] = append(plans[k],
				Action{VM: name, Kind: KindCPUQuota, Group: cgroups.Group{CPU: "/" + name}, Millicores: int64(400 + 200*k)},
				Action{VM: name, Kind: KindBalloon, Bytes: uint64(160+64*k) * mib},
				Action{VM: name, Kind: KindNetEgress, Link: "tap" + name, BitsPerSec: uint64(10+10*k) * 1_000_000})
		}
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		// Alternate so every action really writes (and is audited).
		for _, r := range ex.Apply(context.Background(), plans[i%2]) {
			if r.Outcome != Applied {
				b.Fatalf("%s %s: %s %v", r.Action.VM, r.Action.Kind, r.Outcome, r.Err)
			}
		}
	}
	b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N)/n, "µs/VM")
}

type orderJournal struct {
	log  *[]string
	fail error
	done []mapper.Completion
}

func (j *orderJournal) Intents(es []mapper.Entry) ([]uint64, error) {
	if j.fail != nil {
		return nil, j.fail
	}
	seqs := make([]uint64, len(es))
	for i, e := range es {
		*j.log = append(*j.log, "intent "+e.Target)
		seqs[i] = uint64(i + 1)
	}
	return seqs, nil
}

func (j *orderJournal) Outcomes(cs []mapper.Completion) error {
	j.done = append(j.done, cs...)
	return nil
}

func TestJournalIntentBeforeWrite(t *testing.T) {
	var log []string
	cg := orderCG{&fakeCG{quota: map[string]int64{"/a": 50000, "/b": 50000}}, &log}
	j := &orderJournal{log: &log}
	ex := New(Actuators{CPU: cg}, nil, false, time.Now, "t").WithJournal(j)
	res := ex.Apply(context.Background(), []Action{
		{VM: "a", Kind: KindCPUQuota, Group: cgroups.Group{CPU: "/a"}, Millicores: 900},
		{VM: "b", Kind: KindCPUQuota, Group: cgroups.Group{CPU: "/b"}, Millicores: 500}, // unchanged: not journaled
	})
	if got := strings.Join(log, ","); got != "intent /a,quota /a" {
		t.Fatalf("order %q", got)
	}
	if len(j.done) != 1 || j.done[0].Outcome != "applied" || res[1].Outcome != Unchanged {
		t.Fatalf("outcomes %+v results %+v", j.done, res)
	}
	// Intents that cannot be made durable: nothing is written.
	log = nil
	j.fail = errors.New("disk full")
	res = ex.Apply(context.Background(), []Action{{VM: "a", Kind: KindCPUQuota, Group: cgroups.Group{CPU: "/a"}, Millicores: 300}})
	if res[0].Outcome != Failed || len(log) != 0 || cg.quota["/a"] != 90000 {
		t.Fatalf("wrote without a durable intent: %+v log %v quota %d", res[0], log, cg.quota["/a"])
	}
}

// TestJournalRealFile: with mapper's bbolt journal, a plan leaves no
// pending intent, and each write is there with its outcome.
func TestJournalRealFile(t *testing.T) {
	jr, err := mapper.OpenJournal(filepath.Join(t.TempDir(), "drm.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer jr.Close()
	cg := &fakeCG{quota: map[string]int64{"/a": -1}}
	ex := New(Actuators{CPU: cg}, nil, false, time.Now, "t").WithJournal(jr)
	ex.Apply(context.Background(), []Action{{VM: "a", Kind: KindCPUQuota, Group: cgroups.Group{CPU: "/a"}, Millicores: 300}})
	if p, err := jr.Pending(); err != nil || len(p) != 0 {
		t.Fatalf("pending %+v %v", p, err)
	}
	if s, _ := jr.Intent(mapper.Entry{VM: "x"}); s != 2 {
		t.Fatalf("the plan's write was not journaled (next seq %d)", s)
	}
}
