package synthesizer

import (
	"errors"
	"fmt"
	"math"
	"sort"
	"strings"
	"time"
)

// The Planner is the fleet-wide engine: each tick it takes every VM's SLA,
// required allocation (the forecast) and current allocation, the host's
// capacity, and its own record of loans, and returns a Plan. For every
// managed resource it follows the seed's loop, delta = required − current:
//
//  1. Clamp: a current allocation below the floor is raised to it, above
//     the ceiling cut to it (at once, no dwell). If the host is
//     over-committed (capacity shrank), VMs above their floor are cut,
//     lowest priority first.
//  2. delta < 0: release, only when the set point (required × (1 +
//     GrowHeadroom)) is below current × (1 − ShrinkThreshold) (hysteresis)
//     and MinDwell has passed since the last change of that VM and
//     resource (dwell). Released amounts first repay the VM's loans.
//  3. Reclaim: a lender whose required allocation rose above what it holds
//     takes its loans back first (oldest first), never below the
//     borrower's floor.
//  4. delta > 0, by priority (class, then priority; ties share): take from
//     the free pool — the set point if the pool has it, else the required
//     amount, else a share of the pool proportional to need; if short,
//     borrow from VMs of strictly lower priority: first their predicted
//     idle (allocation − required), largest idle first; then, still short,
//     down to their floor, lowest priority first. Each borrowed amount is
//     a Loan (lender, borrower, resource, amount, since).
//  5. Still short: the VM keeps what it could get (never below its floor,
//     because floors fit the capacity) and is marked throttled, with an
//     Alert.
//
// Growth is immediate; a grow goes to the set point so that a slowly
// rising demand does not write every tick. The Planner is deterministic:
// the same inputs, state and clock give the same Plan. It is not safe for
// concurrent use.
type Planner struct {
	cfg        PlannerConfig
	now        func() time.Time
	lastChange map[string]*[NumResources]time.Time
	loans      []Loan
	loanIdx    map[loanKey]int // built lazily; reset whenever loans are compacted
	w          work
}

// PlannerConfig tunes the Planner.
type PlannerConfig struct {
	// Step is the allocation granularity per resource (≥ 1).
	Step [NumResources]int64
	// ShrinkThreshold is the relative drop below the current allocation
	// that must be exceeded before a release, in [0, 1).
	ShrinkThreshold float64
	// GrowHeadroom: a grow and a release go to required × (1 + this), in
	// [0, 1].
	GrowHeadroom float64
	// MinDwell is the least time between a change and a following release.
	MinDwell time.Duration
}

// DefaultPlannerConfig: 10 m, 16 MiB, 10 IOPS, 64 KiB/s, 100 kbit/s
// steps; 10 % hysteresis and headroom; 10 s dwell (ten 1 s ticks).
func DefaultPlannerConfig() PlannerConfig {
	return PlannerConfig{
		Step:            [NumResources]int64{10, 16, 10, 64 << 10, 100_000},
		ShrinkThreshold: 0.10,
		GrowHeadroom:    0.10,
		MinDwell:        10 * time.Second,
	}
}

// Validate checks ranges.
func (c PlannerConfig) Validate() error {
	for r, s := range c.Step {
		if s < 1 {
			return fmt.Errorf("synthesizer: step of %s must be >= 1, got %d", Resource(r), s)
		}
	}
	if !(c.ShrinkThreshold >= 0 && c.ShrinkThreshold < 1) {
		return fmt.Errorf("synthesizer: shrinkThreshold must be in [0, 1), got %v", c.ShrinkThreshold)
	}
	if !(c.GrowHeadroom >= 0 && c.GrowHeadroom <= 1) {
		return fmt.Errorf("synthesizer: growHeadroom must be in [0, 1], got %v", c.GrowHeadroom)
	}
	if c.MinDwell < 0 || c.MinDwell > 24*time.Hour {
		return fmt.Errorf("synthesizer: minDwell must be in [0, 24h], got %v", c.MinDwell)
	}
	return nil
}

// NewPlanner returns a Planner; now is the clock.
func NewPlanner(cfg PlannerConfig, now func() time.Time) (*Planner, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &Planner{cfg: cfg, now: now, lastChange: map[string]*[NumResources]time.Time{}}, nil
}

// VMInput is one VM's state for a tick.
type VMInput struct {
	Name string
	SLA  SLA
	// Required is the allocation the forecast asks for (e.g. the
	// predictor's Forecast.Alloc, in SLA units); < 0 means unknown (hold).
	Required [NumResources]int64
	// Current is the allocation in force; 0 means none yet.
	Current [NumResources]int64
}

// Loan records an amount of a resource a lower-priority VM (Lender) gave
// up to a higher-priority one (Borrower).
type Loan struct {
	Lender, Borrower string
	Resource         Resource
	Amount           int64
	Since            time.Time
}

// Change is one allocation the executor must write.
type Change struct {
	VM       string
	Resource Resource
	From, To int64
	Reason   string
}

// Shrink reports whether the change lowers the allocation.
func (c Change) Shrink() bool { return c.To < c.From }

// Alert says a VM could not get its required allocation.
type Alert struct {
	VM                       string
	Resource                 Resource
	Required, Granted, Floor int64
	Class                    Class
	Message                  string
}

// VMResult is the Planner's answer for one VM, in the order of the input.
type VMResult struct {
	Name      string
	Target    [NumResources]int64
	Required  [NumResources]int64 // clamped to [floor, ceiling], rounded to the step
	Borrowed  [NumResources]int64 // Σ open loans as borrower
	Lent      [NumResources]int64 // Σ open loans as lender
	Throttled [NumResources]bool  // Target < Required
}

// Plan is one tick's decision.
type Plan struct {
	Time time.Time
	// Changes: every shrink before any grow, so the host is never
	// over-committed mid-plan; then by resource and VM name.
	Changes []Change
	Loans   []Loan // open loans after this tick, by resource, lender, borrower
	Alerts  []Alert
	VMs     []VMResult
	// Free is the unallocated capacity after the plan (−1: unlimited).
	Free [NumResources]int64
}

type loanKey struct {
	lender, borrower string
	r                Resource
}

// Loans returns the open loans (a copy).
func (p *Planner) Loans() []Loan { return append([]Loan(nil), p.loans...) }

// Forget drops the state of a VM that is gone, and its loans.
func (p *Planner) Forget(vm string) {
	delete(p.lastChange, vm)
	out := p.loans[:0]
	for _, l := range p.loans {
		if l.Lender != vm && l.Borrower != vm {
			out = append(out, l)
		}
	}
	p.loans = out
	p.loanIdx = nil
}

// work holds per-tick scratch slices, reused across ticks.
type work struct {
	order                      []int // by rank desc, name asc
	rank                       []int
	floor, ceil, req, set, cur []int64
	alloc                      []int64
	managed, grower            []bool
	reason                     []strings.Builder
	donors                     []int
}

func (w *work) reset(n int) {
	grow := func(s []int64) []int64 {
		if cap(s) < n {
			return make([]int64, n)
		}
		return s[:n]
	}
	w.floor, w.ceil, w.req, w.set, w.cur, w.alloc = grow(w.floor), grow(w.ceil), grow(w.req), grow(w.set), grow(w.cur), grow(w.alloc)
	if cap(w.managed) < n {
		w.managed, w.grower = make([]bool, n), make([]bool, n)
		w.reason = make([]strings.Builder, n)
	}
	w.managed, w.grower, w.reason = w.managed[:n], w.grower[:n], w.reason[:n]
}

func roundUp(x, step int64) int64 {
	if x <= 0 {
		return 0
	}
	return (x + step - 1) / step * step
}

func clamp(x, lo, hi int64) int64 { return max(lo, min(x, hi)) }

// Plan decides one tick. The VMs' SLAs must be valid and their floors
// must fit the capacity (ValidateFleet); otherwise Plan returns an error
// and no plan (the caller keeps the running allocations).
func (p *Planner) Plan(vms []VMInput, c Capacity) (*Plan, error) {
	now := p.now()
	n := len(vms)
	seen := make(map[string]int, n)
	var sum [NumResources]int64
	for i := range vms {
		v := &vms[i]
		if v.Name == "" {
			return nil, errors.New("synthesizer: vm with an empty name")
		}
		if _, dup := seen[v.Name]; dup {
			return nil, fmt.Errorf("synthesizer: vm %s listed twice", v.Name)
		}
		seen[v.Name] = i
		if err := v.SLA.Validate(); err != nil {
			return nil, fmt.Errorf("synthesizer: vm %s: %w", v.Name, err)
		}
		for r := CPU; r < NumResources; r++ {
			if f, _, ok := v.SLA.Bounds(r); ok {
				sum[r] += f
			}
		}
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	for r := CPU; r < NumResources; r++ {
		if a := c.Allocatable(r); a > 0 && sum[r] > a {
			return nil, fmt.Errorf("synthesizer: %s floors sum to %d, above the allocatable %d", r, sum[r], a)
		}
	}
	// Loans of VMs that are gone are dropped.
	kept := p.loans[:0]
	for _, l := range p.loans {
		_, a := seen[l.Lender]
		_, b := seen[l.Borrower]
		if a && b {
			kept = append(kept, l)
		}
	}
	p.loans = kept
	p.loanIdx = nil

	w := &p.w
	w.reset(n)
	if cap(w.order) < n {
		w.order, w.rank = make([]int, n), make([]int, n)
	}
	w.order, w.rank = w.order[:n], w.rank[:n]
	for i := range vms {
		w.order[i] = i
		w.rank[i] = vms[i].SLA.Rank()
	}
	sort.Slice(w.order, func(a, b int) bool {
		i, j := w.order[a], w.order[b]
		if w.rank[i] != w.rank[j] {
			return w.rank[i] > w.rank[j]
		}
		return vms[i].Name < vms[j].Name
	})

	plan := &Plan{Time: now, VMs: make([]VMResult, n)}
	for i := range vms {
		plan.VMs[i].Name = vms[i].Name
		plan.VMs[i].Target = vms[i].Current // unmanaged resources keep theirs
	}
	for r := CPU; r < NumResources; r++ {
		p.planResource(r, vms, c.Allocatable(r), now, plan)
	}
	// Loans: drop empty, report sorted, fill per-VM totals.
	kept = p.loans[:0]
	for _, l := range p.loans {
		if l.Amount > 0 {
			kept = append(kept, l)
			plan.VMs[seen[l.Lender]].Lent[l.Resource] += l.Amount
			plan.VMs[seen[l.Borrower]].Borrowed[l.Resource] += l.Amount
		}
	}
	p.loans = kept
	p.loanIdx = nil
	plan.Loans = append([]Loan(nil), p.loans...)
	sort.Slice(plan.Loans, func(a, b int) bool {
		x, y := plan.Loans[a], plan.Loans[b]
		if x.Resource != y.Resource {
			return x.Resource < y.Resource
		}
		if x.Lender != y.Lender {
			return x.Lender < y.Lender
		}
		return x.Borrower < y.Borrower
	})
	sort.SliceStable(plan.Changes, func(a, b int) bool {
		x, y := plan.Changes[a], plan.Changes[b]
		if x.Shrink() != y.Shrink() {
			return x.Shrink()
		}
		if x.Resource != y.Resource {
			return x.Resource < y.Resource
		}
		return x.VM < y.VM
	})
	return plan, nil
}

func (p *Planner) note(i int, format string, args ...any) {
	b := &p.w.reason[i]
	if b.Len() > 0 {
		b.WriteString("; ")
	}
	fmt.Fprintf(b, format, args...)
}

// planResource runs the loop for one resource. capa ≤ 0: unlimited.
func (p *Planner) planResource(r Resource, vms []VMInput, capa int64, now time.Time, plan *Plan) {
	w := &p.w
	step := p.cfg.Step[r]
	some := false
	for i := range vms {
		w.reason[i].Reset()
		f, ce, ok := vms[i].SLA.Bounds(r)
		w.managed[i], w.grower[i] = ok, false
		cur := vms[i].Current[r]
		w.cur[i], w.alloc[i] = cur, cur
		if !ok {
			continue
		}
		some = true
		w.floor[i], w.ceil[i] = f, ce
		req := vms[i].Required[r]
		if req < 0 { // unknown: hold what it has
			req = clamp(cur, f, ce)
		}
		w.req[i] = clamp(roundUp(req, step), f, ce)
		w.set[i] = clamp(roundUp(int64(math.Ceil(float64(req)*(1+p.cfg.GrowHeadroom))), step), f, ce)
		a := clamp(cur, f, ce)
		switch {
		case cur < f:
			p.note(i, "raised to floor %d", f)
		case cur > ce:
			p.note(i, "cut to ceiling %d", ce)
		}
		w.alloc[i] = a
		switch {
		case w.req[i] > a:
			w.grower[i] = true
		case w.set[i] < a && float64(a-w.set[i]) > p.cfg.ShrinkThreshold*float64(a):
			if lc := p.lastChange[vms[i].Name]; lc != nil && !lc[r].IsZero() && now.Sub(lc[r]) < p.cfg.MinDwell {
				break // dwell: hold
			}
			p.note(i, "release %d (required %d)", a-w.set[i], w.req[i])
			p.repay(vms[i].Name, r, a-w.set[i])
			w.alloc[i] = w.set[i]
		}
	}
	if !some {
		return
	}
	unlimited := capa <= 0
	if unlimited {
		capa = math.MaxInt64 / 4
	}
	var total int64
	for i := range vms {
		if w.managed[i] {
			total += w.alloc[i]
		}
	}
	// Over-committed (capacity lowered, floors raised): cut, lowest
	// priority first, down to floors (which fit).
	if total > capa {
		for k := len(w.order) - 1; k >= 0 && total > capa; k-- {
			i := w.order[k]
			if !w.managed[i] {
				continue
			}
			x := min(total-capa, w.alloc[i]-w.floor[i])
			if x > 0 {
				w.alloc[i] -= x
				total -= x
				p.repay(vms[i].Name, r, x)
				p.note(i, "cut %d: host over-committed", x)
			}
		}
	}
	// Reclaim: lenders that need more take their loans back first
	// (oldest first: loans are kept in creation order).
	if len(p.loans) > 0 {
		pos := make(map[string]int, len(vms))
		for i := range vms {
			pos[vms[i].Name] = i
		}
		byLender := map[int][]int{}
		for k, l := range p.loans {
			if l.Resource == r && l.Amount > 0 {
				j := pos[l.Lender]
				if w.managed[j] && w.req[j] > w.alloc[j] {
					byLender[j] = append(byLender[j], k)
				}
			}
		}
		for _, i := range w.order {
			ks, ok := byLender[i]
			if !ok {
				continue
			}
			for _, k := range ks {
				l := &p.loans[k]
				need := w.req[i] - w.alloc[i]
				if need <= 0 {
					break
				}
				b := pos[l.Borrower]
				x := min(need, l.Amount, w.alloc[b]-w.floor[b])
				if x <= 0 {
					continue
				}
				w.alloc[b] -= x
				w.alloc[i] += x
				l.Amount -= x
				p.note(i, "reclaimed %d from %s", x, l.Borrower)
				p.note(b, "returned %d to %s", x, l.Lender)
			}
		}
	}
	total = 0
	for i := range vms {
		if w.managed[i] {
			total += w.alloc[i]
		}
	}
	pool := capa - total

	// Donor candidates by predicted idle, largest first (computed once).
	w.donors = w.donors[:0]
	for i := range vms {
		if w.managed[i] {
			w.donors = append(w.donors, i)
		}
	}
	sort.Slice(w.donors, func(a, b int) bool {
		i, j := w.donors[a], w.donors[b]
		ii, ij := w.alloc[i]-w.req[i], w.alloc[j]-w.req[j]
		if ii != ij {
			return ii > ij
		}
		if w.rank[i] != w.rank[j] {
			return w.rank[i] < w.rank[j]
		}
		return vms[i].Name < vms[j].Name
	})
	idleEnd := len(w.donors) // donors from here on had no idle to begin with
	for idleEnd > 0 && w.alloc[w.donors[idleEnd-1]]-w.req[w.donors[idleEnd-1]] <= 0 {
		idleEnd--
	}
	deepEnd := len(w.order) // w.order[deepEnd:] are at their floor (or unmanaged)

	// Grow, one priority group at a time.
	for g := 0; g < len(w.order); {
		h := g
		for h < len(w.order) && w.rank[w.order[h]] == w.rank[w.order[g]] {
			h++
		}
		group := w.order[g:h]
		g = h
		var soft, hard int64
		for _, i := range group {
			if !w.managed[i] || w.req[i] <= w.alloc[i] {
				continue
			}
			w.grower[i] = true
			soft += w.set[i] - w.alloc[i]
			hard += w.req[i] - w.alloc[i]
		}
		if hard == 0 {
			continue
		}
		// Pool.
		switch {
		case pool >= soft:
			for _, i := range group {
				if w.grower[i] && w.req[i] > w.alloc[i] {
					x := w.set[i] - w.alloc[i]
					w.alloc[i] += x
					pool -= x
					p.note(i, "grow %d from pool", x)
				}
			}
		case pool >= hard:
			for _, i := range group {
				if w.grower[i] && w.req[i] > w.alloc[i] {
					x := w.req[i] - w.alloc[i]
					w.alloc[i] += x
					pool -= x
					p.note(i, "grow %d from pool", x)
				}
			}
		case pool > 0:
			share := pool
			for _, i := range group {
				if w.grower[i] && w.req[i] > w.alloc[i] {
					need := w.req[i] - w.alloc[i]
					x := int64(float64(share) * float64(need) / float64(hard))
					x = min(x, need, pool)
					w.alloc[i] += x
					pool -= x
					if x > 0 {
						p.note(i, "grow %d from pool (share)", x)
					}
				}
			}
			for _, i := range group { // rounding remainder, in order
				if pool == 0 {
					break
				}
				if w.grower[i] && w.req[i] > w.alloc[i] {
					x := min(pool, w.req[i]-w.alloc[i])
					w.alloc[i] += x
					pool -= x
				}
			}
		}
		// Borrow from strictly lower priority.
		for _, i := range group {
			if !w.grower[i] || w.req[i] <= w.alloc[i] {
				continue
			}
			// Pass 1: predicted idle, largest first.
			for _, j := range w.donors[:idleEnd] {
				need := w.req[i] - w.alloc[i]
				if need <= 0 {
					break
				}
				if w.rank[j] >= w.rank[i] {
					continue
				}
				x := min(need, w.alloc[j]-max(w.req[j], w.floor[j]))
				if x > 0 {
					p.lend(vms, j, i, r, x, now)
				}
			}
			// Pass 2: down to the floor, lowest priority first. Donors
			// left at their floor stay there for the rest of the tick.
			for deepEnd > 0 && (!w.managed[w.order[deepEnd-1]] || w.alloc[w.order[deepEnd-1]] <= w.floor[w.order[deepEnd-1]]) {
				deepEnd--
			}
			for k := deepEnd - 1; k >= 0; k-- {
				j := w.order[k]
				need := w.req[i] - w.alloc[i]
				if need <= 0 || w.rank[j] >= w.rank[i] {
					break
				}
				if !w.managed[j] {
					continue
				}
				x := min(need, w.alloc[j]-w.floor[j])
				if x > 0 {
					p.lend(vms, j, i, r, x, now)
				}
			}
		}
	}

	// Results, throttles, changes.
	var used int64
	for i := range vms {
		res := &plan.VMs[i]
		if !w.managed[i] {
			res.Target[r] = w.cur[i]
			continue
		}
		a := w.alloc[i]
		used += a
		res.Target[r], res.Required[r] = a, w.req[i]
		if a < w.req[i] {
			res.Throttled[r] = true
			msg := fmt.Sprintf("throttled: %s required %d, granted %d (floor %d); pool and lower-priority VMs exhausted", r, w.req[i], a, w.floor[i])
			p.note(i, "%s", msg)
			plan.Alerts = append(plan.Alerts, Alert{VM: vms[i].Name, Resource: r, Required: w.req[i], Granted: a,
				Floor: w.floor[i], Class: vms[i].SLA.Class.Norm(), Message: msg})
		}
		if a != w.cur[i] {
			plan.Changes = append(plan.Changes, Change{VM: vms[i].Name, Resource: r, From: w.cur[i], To: a, Reason: w.reason[i].String()})
			lc := p.lastChange[vms[i].Name]
			if lc == nil {
				lc = new([NumResources]time.Time)
				p.lastChange[vms[i].Name] = lc
			}
			lc[r] = now
		}
	}
	if unlimited {
		plan.Free[r] = -1
	} else {
		plan.Free[r] = capa - used
	}
	// A borrower never holds more on loan than it has above its floor.
	p.capLoans(vms, r)
}

// lend moves x of r from j to i and records the loan.
func (p *Planner) lend(vms []VMInput, j, i int, r Resource, x int64, now time.Time) {
	w := &p.w
	w.alloc[j] -= x
	w.alloc[i] += x
	p.note(i, "borrowed %d from %s", x, vms[j].Name)
	p.note(j, "lent %d to %s", x, vms[i].Name)
	key := loanKey{vms[j].Name, vms[i].Name, r}
	if p.loanIdx == nil {
		p.loanIdx = map[loanKey]int{}
		for k, l := range p.loans {
			p.loanIdx[loanKey{l.Lender, l.Borrower, l.Resource}] = k
		}
	}
	if k, ok := p.loanIdx[key]; ok {
		l := &p.loans[k]
		if l.Amount <= 0 {
			l.Since = now
		}
		l.Amount += x
		return
	}
	p.loanIdx[key] = len(p.loans)
	p.loans = append(p.loans, Loan{Lender: vms[j].Name, Borrower: vms[i].Name, Resource: r, Amount: x, Since: now})
}

// repay closes a borrower's loans of r by up to x, newest first.
func (p *Planner) repay(borrower string, r Resource, x int64) {
	for k := len(p.loans) - 1; k >= 0 && x > 0; k-- {
		l := &p.loans[k]
		if l.Resource == r && l.Borrower == borrower && l.Amount > 0 {
			y := min(x, l.Amount)
			l.Amount -= y
			x -= y
		}
	}
}

func (p *Planner) capLoans(vms []VMInput, r Resource) {
	if len(p.loans) == 0 {
		return
	}
	w := &p.w
	var over map[string]int64
	sums := map[string]int64{}
	for _, l := range p.loans {
		if l.Resource == r {
			sums[l.Borrower] += l.Amount
		}
	}
	if len(sums) == 0 {
		return
	}
	for i := range vms {
		if s, ok := sums[vms[i].Name]; ok && w.managed[i] {
			if room := w.alloc[i] - w.floor[i]; s > room {
				if over == nil {
					over = map[string]int64{}
				}
				over[vms[i].Name] = s - room
			}
		}
	}
	for name, x := range over {
		p.repay(name, r, x)
	}
}
