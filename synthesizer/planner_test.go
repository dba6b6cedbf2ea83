package synthesizer

import (
	"fmt"
	"math"
	"strings"
	"testing"
	"time"
)

func cpuSLA(floor, ceil int64, class Class, prio int) SLA {
	return SLA{CPU: CPUSLA{FloorMillicores: floor, CeilingMillicores: ceil}, Class: class, Priority: prio}
}

func cpuCap(total int64) Capacity {
	var c Capacity
	c.Set(CPU, total, 0)
	return c
}

func testPlanner(t *testing.T, cfg PlannerConfig) (*Planner, *clock) {
	t.Helper()
	c := &clock{t: time.Unix(10_000, 0)}
	p, err := NewPlanner(cfg, c.now)
	if err != nil {
		t.Fatal(err)
	}
	return p, c
}

// noHeadroom makes targets exact so tests can state them.
func noHeadroom() PlannerConfig {
	c := DefaultPlannerConfig()
	c.GrowHeadroom = 0
	c.Step[CPU] = 1
	return c
}

func vm(name string, sla SLA, req, cur int64) VMInput {
	v := VMInput{Name: name, SLA: sla}
	v.Required[CPU], v.Current[CPU] = req, cur
	return v
}

// apply carries a plan's targets into the next tick's Current.
func apply(vms []VMInput, p *Plan) {
	for i := range vms {
		vms[i].Current = p.VMs[i].Target
	}
}

func mustPlan(t *testing.T, p *Planner, vms []VMInput, c Capacity) *Plan {
	t.Helper()
	pl, err := p.Plan(vms, c)
	if err != nil {
		t.Fatal(err)
	}
	var sum int64
	for i, r := range pl.VMs {
		sum += r.Target[CPU]
		if f := vms[i].SLA.CPU.FloorMillicores; r.Target[CPU] < f {
			t.Fatalf("%s below floor: %d < %d", r.Name, r.Target[CPU], f)
		}
	}
	if a := c.Allocatable(CPU); a > 0 && sum > a {
		t.Fatalf("allocations %d above capacity %d", sum, a)
	}
	// Shrinks strictly before grows.
	grown := false
	for _, ch := range pl.Changes {
		if !ch.Shrink() {
			grown = true
		} else if grown {
			t.Fatalf("shrink after grow in %+v", pl.Changes)
		}
	}
	return pl
}

func TestPlannerGrowFromPool(t *testing.T) {
	p, _ := testPlanner(t, noHeadroom())
	vms := []VMInput{vm("a", cpuSLA(100, 4000, Standard, 0), 1500, 500)}
	pl := mustPlan(t, p, vms, cpuCap(4000))
	if got := pl.VMs[0].Target[CPU]; got != 1500 {
		t.Fatalf("target %d, want 1500", got)
	}
	if len(pl.Changes) != 1 || !strings.Contains(pl.Changes[0].Reason, "from pool") || len(pl.Loans) != 0 || len(pl.Alerts) != 0 {
		t.Fatalf("plan %+v", pl)
	}
	if pl.Free[CPU] != 2500 {
		t.Fatalf("free %d", pl.Free[CPU])
	}
}

func TestPlannerHeadroomAndCeiling(t *testing.T) {
	cfg := DefaultPlannerConfig() // 10 % headroom, 10 m step
	p, _ := testPlanner(t, cfg)
	vms := []VMInput{vm("a", cpuSLA(100, 1200, Standard, 0), 1000, 500), vm("b", cpuSLA(100, 4000, Standard, 0), 1001, 0)}
	pl := mustPlan(t, p, vms, cpuCap(8000))
	if a, b := pl.VMs[0].Target[CPU], pl.VMs[1].Target[CPU]; a != 1100 || b != 1110 {
		t.Fatalf("targets %d %d, want 1100 (1000+10%%) and 1110 (1001 → 1010 step, ×1.1 → 1110)", a, b)
	}
	vms[0].Required[CPU] = 5000
	apply(vms, pl)
	pl = mustPlan(t, p, vms, cpuCap(8000))
	if a := pl.VMs[0].Target[CPU]; a != 1200 {
		t.Fatalf("target %d, want ceiling 1200", a)
	}
	if pl.VMs[0].Throttled[CPU] {
		t.Fatal("capped at ceiling is not throttled")
	}
}

func TestPlannerReleaseFeedsPoolBeforeBorrowing(t *testing.T) {
	p, _ := testPlanner(t, noHeadroom())
	// Capacity 3000, all allocated; hi needs +800. The others are idle and
	// past their dwell (never changed), so they release and hi grows from
	// the pool: no loan.
	vms := []VMInput{
		vm("hi", cpuSLA(100, 3000, Critical, 0), 1300, 500),
		vm("lo1", cpuSLA(100, 3000, BestEffort, 0), 400, 700),
		vm("lo2", cpuSLA(100, 3000, Standard, 5), 200, 800),
		vm("peer", cpuSLA(100, 3000, Critical, 0), 100, 1000),
	}
	pl := mustPlan(t, p, vms, cpuCap(3000))
	want := map[string]int64{"hi": 1300, "lo1": 400, "lo2": 200, "peer": 100}
	for _, r := range pl.VMs {
		if r.Target[CPU] != want[r.Name] {
			t.Errorf("%s = %d, want %d", r.Name, r.Target[CPU], want[r.Name])
		}
	}
	if len(pl.Loans) != 0 || len(pl.Changes) != 4 || pl.Changes[3].VM != "hi" {
		t.Fatalf("loans %+v changes %+v", pl.Loans, pl.Changes)
	}
}

func TestPlannerBorrowIdleFirstByIdle(t *testing.T) {
	cfg := noHeadroom()
	cfg.ShrinkThreshold = 0.99 // nobody releases on its own: only borrowing frees CPU
	p, _ := testPlanner(t, cfg)
	vms := []VMInput{
		vm("hi", cpuSLA(100, 3000, Critical, 0), 1300, 500),
		vm("lo1", cpuSLA(100, 3000, BestEffort, 0), 400, 700),
		vm("lo2", cpuSLA(100, 3000, Standard, 5), 200, 800),
		vm("peer", cpuSLA(100, 3000, Critical, 0), 100, 1000),
	}
	pl := mustPlan(t, p, vms, cpuCap(3000))
	want := map[string]int64{"hi": 1300, "lo2": 200, "lo1": 500, "peer": 1000}
	for _, r := range pl.VMs {
		if r.Target[CPU] != want[r.Name] {
			t.Errorf("%s = %d, want %d", r.Name, r.Target[CPU], want[r.Name])
		}
	}
	if len(pl.Loans) != 2 || pl.Loans[0].Lender != "lo1" || pl.Loans[0].Amount != 200 || pl.Loans[1].Lender != "lo2" || pl.Loans[1].Amount != 600 {
		t.Fatalf("loans %+v", pl.Loans)
	}
	if pl.VMs[0].Borrowed[CPU] != 800 || pl.VMs[2].Lent[CPU] != 600 {
		t.Fatalf("borrowed/lent %+v", pl.VMs)
	}
	if pl.Changes[0].To >= pl.Changes[0].From || pl.Changes[len(pl.Changes)-1].VM != "hi" {
		t.Fatalf("order %+v", pl.Changes)
	}
}

func TestPlannerFloorRespectedAndThrottle(t *testing.T) {
	cfg := noHeadroom()
	p, _ := testPlanner(t, cfg)
	// hi needs 2500 of 3000; lo's floor is 800 and it needs 2000 itself.
	vms := []VMInput{
		vm("hi", cpuSLA(200, 3000, Critical, 0), 2500, 1000),
		vm("lo", cpuSLA(800, 3000, BestEffort, 0), 2000, 2000),
	}
	pl := mustPlan(t, p, vms, cpuCap(3000))
	if hi, lo := pl.VMs[0].Target[CPU], pl.VMs[1].Target[CPU]; hi != 2200 || lo != 800 {
		t.Fatalf("hi %d lo %d, want 2200 and 800 (lo at its floor)", hi, lo)
	}
	if !pl.VMs[0].Throttled[CPU] || !pl.VMs[1].Throttled[CPU] || len(pl.Alerts) != 2 {
		t.Fatalf("want both throttled with alerts: %+v", pl.Alerts)
	}
	if a := pl.Alerts[0]; a.VM != "hi" || a.Required != 2500 || a.Granted != 2200 || !strings.Contains(a.Message, "throttled") {
		t.Fatalf("alert %+v", a)
	}
}

func TestPlannerSamePriorityShares(t *testing.T) {
	p, _ := testPlanner(t, noHeadroom())
	vms := []VMInput{
		vm("a", cpuSLA(100, 5000, Standard, 0), 3000, 100),
		vm("b", cpuSLA(100, 5000, Standard, 0), 1000, 100),
	}
	pl := mustPlan(t, p, vms, cpuCap(2200))
	// pool 2000, need 2900 + 900: proportional shares.
	a, b := pl.VMs[0].Target[CPU], pl.VMs[1].Target[CPU]
	if a+b != 2200 || a < 1600 || b < 500 || len(pl.Loans) != 0 {
		t.Fatalf("a %d b %d loans %v", a, b, pl.Loans)
	}
}

func TestPlannerReleaseHysteresisAndDwell(t *testing.T) {
	cfg := noHeadroom()
	cfg.MinDwell = 10 * time.Second
	p, c := testPlanner(t, cfg)
	vms := []VMInput{vm("a", cpuSLA(100, 4000, Standard, 0), 2000, 1000)}
	pl := mustPlan(t, p, vms, cpuCap(4000))
	apply(vms, pl) // grew to 2000 at t0
	c.t = c.t.Add(time.Second)
	vms[0].Required[CPU] = 1850 // 7.5 % drop: inside the 10 % band
	if pl = mustPlan(t, p, vms, cpuCap(4000)); len(pl.Changes) != 0 {
		t.Fatalf("hysteresis: %+v", pl.Changes)
	}
	vms[0].Required[CPU] = 1000 // big drop, but dwell not over
	if pl = mustPlan(t, p, vms, cpuCap(4000)); len(pl.Changes) != 0 {
		t.Fatalf("dwell: %+v", pl.Changes)
	}
	c.t = c.t.Add(9 * time.Second)
	pl = mustPlan(t, p, vms, cpuCap(4000))
	if len(pl.Changes) != 1 || pl.Changes[0].To != 1000 || !strings.Contains(pl.Changes[0].Reason, "release") {
		t.Fatalf("release after dwell: %+v", pl.Changes)
	}
	// Growth is never held by dwell.
	apply(vms, pl)
	vms[0].Required[CPU] = 3000
	if pl = mustPlan(t, p, vms, cpuCap(4000)); pl.VMs[0].Target[CPU] != 3000 {
		t.Fatalf("grow right after a change: %+v", pl.Changes)
	}
}

// A sine demand must not write every tick: at most
// ceil(log(max/min)/log(1+headroom)) grows and ceil(period/2/dwell)+1
// releases per period.
func TestPlannerBoundedWritesUnderSine(t *testing.T) {
	cfg := DefaultPlannerConfig() // 10 % headroom and band, 10 s dwell
	p, c := testPlanner(t, cfg)
	const period = 60 // ticks of 1 s
	vms := []VMInput{vm("a", cpuSLA(100, 4000, Standard, 0), 0, 0)}
	count := func(p *Planner, ticks int) (changes int) {
		for k := 0; k < ticks; k++ {
			vms[0].Required[CPU] = int64(1200 + 800*math.Sin(2*math.Pi*float64(k)/period))
			pl := mustPlan(t, p, vms, cpuCap(4000))
			if k >= period { // first period warms up
				changes += len(pl.Changes)
			}
			if pl.VMs[0].Target[CPU] < vms[0].Required[CPU] {
				t.Fatalf("tick %d: allocation %d below demand %d", k, pl.VMs[0].Target[CPU], vms[0].Required[CPU])
			}
			apply(vms, pl)
			c.t = c.t.Add(time.Second)
		}
		return changes
	}
	got := count(p, 6*period)
	perPeriod := float64(got) / 5
	bound := math.Ceil(math.Log(2000.0/400)/math.Log(1.1)) + math.Ceil(period/2/10.0) + 1
	t.Logf("%.1f changes per %d-tick period (bound %.0f)", perPeriod, period, bound)
	if perPeriod > bound {
		t.Fatalf("%.1f changes per period, bound %.0f", perPeriod, bound)
	}
	// Without hysteresis, headroom and dwell it would write nearly every tick.
	raw := DefaultPlannerConfig()
	raw.GrowHeadroom, raw.ShrinkThreshold, raw.MinDwell, raw.Step[CPU] = 0, 0, 0, 1
	p2, _ := testPlanner(t, raw)
	vms[0].Current[CPU] = 0
	if n := float64(count(p2, 6*period)) / 5; n < period*0.8 || perPeriod > n/3 {
		t.Fatalf("raw %.1f vs damped %.1f changes per period", n, perPeriod)
	}
}

func TestPlannerReclaimOnLenderRise(t *testing.T) {
	p, c := testPlanner(t, noHeadroom())
	vms := []VMInput{
		vm("hi", cpuSLA(100, 3000, Critical, 0), 2000, 1000),
		vm("lo", cpuSLA(100, 3000, BestEffort, 0), 500, 2000),
	}
	cp := cpuCap(3000)
	pl := mustPlan(t, p, vms, cp)
	apply(vms, pl)
	// lo idle 1500 > need 1000: pool gets lo's release? lo never changed,
	// so it releases to 500 first; hi grows from the pool, no loan.
	if len(pl.Loans) != 0 {
		t.Fatalf("release then pool, no loan: %+v", pl.Loans)
	}
	// Now force a loan: hi needs 2800, lo holds 1000 through dwell.
	c.t = c.t.Add(time.Second)
	vms[1].Current[CPU] = 1000
	vms[0].Current[CPU] = 2000
	vms[1].Required[CPU] = 300
	vms[0].Required[CPU] = 2800
	pl = mustPlan(t, p, vms, cp)
	if len(pl.Loans) != 1 || pl.Loans[0].Amount != 800 || pl.Loans[0].Lender != "lo" || !pl.Loans[0].Since.Equal(c.t) {
		t.Fatalf("loans %+v changes %+v", pl.Loans, pl.Changes)
	}
	apply(vms, pl)
	// Another VM appears with free capacity? No: lender's demand rises.
	// Capacity grows so the pool could serve lo — but its loan is
	// reclaimed first (hi refills from the pool).
	c.t = c.t.Add(time.Second)
	vms[1].Required[CPU] = 900
	cp = cpuCap(4000)
	pl = mustPlan(t, p, vms, cp)
	if lo := pl.VMs[1].Target[CPU]; lo != 900 {
		t.Fatalf("lo %d, want 900", lo)
	}
	found := false
	for _, ch := range pl.Changes {
		found = found || (ch.VM == "lo" && strings.Contains(ch.Reason, "reclaimed 700 from hi"))
	}
	if !found {
		t.Fatalf("no reclaim: %+v", pl.Changes)
	}
	if len(pl.Loans) != 1 || pl.Loans[0].Amount != 100 {
		t.Fatalf("loan after reclaim %+v", pl.Loans)
	}
	if hi := pl.VMs[0].Target[CPU]; hi != 2800 {
		t.Fatalf("hi %d, want 2800 (refilled from pool)", hi)
	}
	// Borrower releases: its loan is repaid.
	apply(vms, pl)
	c.t = c.t.Add(time.Minute)
	vms[0].Required[CPU] = 500
	pl = mustPlan(t, p, vms, cp)
	if len(pl.Loans) != 0 {
		t.Fatalf("loan not repaid by release: %+v", pl.Loans)
	}
}

func TestPlannerClampAndOvercommit(t *testing.T) {
	p, _ := testPlanner(t, noHeadroom())
	vms := []VMInput{
		vm("hi", cpuSLA(500, 2000, Critical, 0), 100, 3000), // above ceiling
		vm("lo", cpuSLA(400, 3000, BestEffort, 0), 2500, 0), // below floor (new)
		vm("mid", cpuSLA(100, 3000, Standard, 0), -1, 2000), // unknown: hold
	}
	pl := mustPlan(t, p, vms, cpuCap(3000))
	hi, lo, mid := pl.VMs[0].Target[CPU], pl.VMs[1].Target[CPU], pl.VMs[2].Target[CPU]
	if lo < 400 || hi > 2000 || hi+lo+mid > 3000 {
		t.Fatalf("hi %d lo %d mid %d", hi, lo, mid)
	}
}

func TestPlannerErrorsAndDeterminism(t *testing.T) {
	p, _ := testPlanner(t, noHeadroom())
	if _, err := p.Plan([]VMInput{vm("a", cpuSLA(2000, 3000, Standard, 0), 0, 0), vm("b", cpuSLA(2000, 3000, Standard, 0), 0, 0)}, cpuCap(3000)); err == nil || !strings.Contains(err.Error(), "floors sum to 4000") {
		t.Fatalf("floors: %v", err)
	}
	if _, err := p.Plan([]VMInput{vm("a", cpuSLA(5, 3000, Standard, 0), 0, 0)}, cpuCap(3000)); err == nil || !strings.Contains(err.Error(), "vm a: cpu.floorMillicores") {
		t.Fatalf("sla: %v", err)
	}
	if _, err := p.Plan([]VMInput{vm("a", cpuSLA(100, 300, Standard, 0), 0, 0), vm("a", cpuSLA(100, 300, Standard, 0), 0, 0)}, cpuCap(3000)); err == nil {
		t.Fatal("duplicate accepted")
	}
	if _, err := NewPlanner(PlannerConfig{}, time.Now); err == nil {
		t.Fatal("zero step accepted")
	}
	run := func() string {
		p, _ := testPlanner(t, DefaultPlannerConfig())
		var b strings.Builder
		vms := make([]VMInput, 30)
		for i := range vms {
			vms[i] = vm(fmt.Sprintf("vm%02d", i), cpuSLA(100, 4000, Classes()[i%3], i%4), int64(300+(i*7919)%2500), 0)
		}
		for k := 0; k < 5; k++ {
			pl := mustPlan(t, p, vms, cpuCap(20000))
			fmt.Fprintf(&b, "%v|%v|%v\n", pl.Changes, pl.Loans, pl.Alerts)
			apply(vms, pl)
			for i := range vms {
				vms[i].Required[CPU] = int64(300 + (i*7919+k*104729)%2500)
			}
		}
		return b.String()
	}
	if a, b := run(), run(); a != b {
		t.Fatal("not deterministic")
	}
}

func TestPlannerOtherResources(t *testing.T) {
	p, _ := testPlanner(t, DefaultPlannerConfig())
	s := cpuSLA(100, 1000, Standard, 0)
	s.Memory = MemorySLA{FloorMiB: 256, CeilingMiB: 4096}
	in := vm("a", s, 500, 500)
	in.Required[Memory], in.Current[Memory] = 1000, 512
	in.Required[Network], in.Current[Network] = 5, 7 // unmanaged: untouched
	var c Capacity
	c.Set(CPU, 4000, 0)
	c.Set(Memory, 8192, 1024)
	pl := mustPlan(t, p, []VMInput{in}, c)
	if got := pl.VMs[0].Target[Memory]; got != 1104 { // 1000 × 1.1 = 1100 → 16 MiB step
		t.Fatalf("memory %d", got)
	}
	if pl.VMs[0].Target[Network] != 7 || pl.Free[Memory] != 7168-1104 || pl.Free[Network] != 0 {
		t.Fatalf("%+v free %v", pl.VMs[0], pl.Free)
	}
}

func BenchmarkPlan1000(b *testing.B) {
	c := &clock{t: time.Unix(0, 0)}
	p, err := NewPlanner(DefaultPlannerConfig(), c.now)
	if err != nil {
		b.Fatal(err)
	}
	const n = 1000
	vms := make([]VMInput, n)
	for i := range vms {
		s := cpuSLA(100, 8000, Classes()[i%3], i%10)
		s.Memory = MemorySLA{FloorMiB: 256, CeilingMiB: 8192}
		vms[i] = vm(fmt.Sprintf("vm%04d", i), s, 0, 0)
	}
	var capa Capacity
	capa.Set(CPU, n*900, 0) // demand averages ~1000 m: contention
	capa.Set(Memory, n*1024, 0)
	b.ReportAllocs()
	b.ResetTimer()
	for k := 0; k < b.N; k++ {
		for i := range vms {
			x := float64(i*7 + k)
			vms[i].Required[CPU] = int64(1000 + 600*math.Sin(x/13))
			vms[i].Required[Memory] = int64(900 + 400*math.Sin(x/29))
		}
		pl, err := p.Plan(vms, capa)
		if err != nil {
			b.Fatal(err)
		}
		apply(vms, pl)
		c.t = c.t.Add(time.Second)
	}
}

// With no idle anywhere, borrowing goes down to floors, lowest priority
// first, and never touches an equal or higher priority.
func TestPlannerDeepBorrowLowestFirst(t *testing.T) {
	p, _ := testPlanner(t, noHeadroom())
	vms := []VMInput{
		vm("crit", cpuSLA(100, 5000, Critical, 0), 2000, 1000),
		vm("std", cpuSLA(300, 5000, Standard, 0), 1000, 1000),
		vm("be", cpuSLA(200, 5000, BestEffort, 0), 1000, 1000),
		vm("crit2", cpuSLA(100, 5000, Critical, 0), 1000, 1000),
	}
	pl := mustPlan(t, p, vms, cpuCap(4000))
	want := map[string]int64{"crit": 2000, "std": 800, "be": 200, "crit2": 1000}
	for _, r := range pl.VMs {
		if r.Target[CPU] != want[r.Name] {
			t.Errorf("%s = %d, want %d", r.Name, r.Target[CPU], want[r.Name])
		}
	}
	if len(pl.Loans) != 2 || pl.Loans[0].Lender != "be" || pl.Loans[0].Amount != 800 || pl.Loans[1].Lender != "std" || pl.Loans[1].Amount != 200 {
		t.Fatalf("loans %+v", pl.Loans)
	}
	if !pl.VMs[1].Throttled[CPU] || !pl.VMs[2].Throttled[CPU] || pl.VMs[0].Throttled[CPU] {
		t.Fatalf("throttles %+v", pl.Alerts)
	}
	p.Forget("be")
	if l := p.Loans(); len(l) != 1 || l[0].Lender != "std" {
		t.Fatalf("after Forget: %+v", l)
	}
}

type clock struct{ t time.Time }

func (c *clock) now() time.Time { return c.t }
