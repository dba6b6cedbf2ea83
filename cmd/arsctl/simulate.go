package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/ars-dev/ars/predictor"
	"github.com/ars-dev/ars/synthesizer"
)

// simulate replays a trace through the predictor and the synthesizer's
// Planner on one host with fake actuators (the plan's targets become the
// next step's current allocations):
//
//	arsctl simulate --trace PATH --capacity cpu=X[,mem=Y] [--sla FILE] --out FILE
//	    [--model ars] [--target-violation 0.02] [--vms N] [--steps N]
//
// Units. Every amount — capacity, SLA floors and ceilings, the output
// columns — is in the trace's own unit: MHz (cpu) and KB (mem) for
// Bitbrains, percent points for the long format. A capacity "cpu=60%" is
// 60 % of the sum over VMs of each VM's peak usage in the replayed steps.
// Internally amounts are integers in a scaled unit (a power of ten chosen
// so the CPU capacity is between 10^5 and 10^6), so values are exact to
// about 10^-5 of the capacity.
//
// Time. The VMs' samples are put on one grid, t0 + k × step (t0 the
// earliest sample, step the trace's median interval); a VM's usage at a
// grid point is its last sample at or before it (plus half a step), 0
// before its first sample.
//
// Default SLAs (without --sla, or for VMs the file does not name when it
// has no default): VM number k in trace order (natural sort of the file
// names) gets class critical, standard, best-effort for k mod 3 = 0, 1, 2
// and priority (k / 3) mod 10; class weights 3, 2, 1; the floor is half
// the capacity split by weight (floor_k = 0.5 × C × w_k / Σw); the ceiling
// is the whole capacity. With --sla FILE (synthesizer.ParseFleet's YAML,
// amounts in the trace's unit; its capacity section is ignored) VMs it
// names get their SLA, others its default, else the spread defaults.
//
// Demand. The planner's required amount for step k is the predictor's
// Forecast.Alloc after observing steps 0..k-1 (the backtest protocol); at
// step 0 a VM holds its floor. The replayed usage is not censored by the
// allocation (a trace cannot replay what a throttled VM would have used).
//
// Static comparison. The same total capacity handed out once, (a) in
// proportion to the floors (i.e. to the class weights) and (b) split
// equally.
func simulate(args []string, out io.Writer) error {
	fs := flag.NewFlagSet("arsctl simulate", flag.ContinueOnError)
	fs.SetOutput(out)
	var o simOptions
	fs.StringVar(&o.Trace, "trace", "", "Bitbrains directory/file or long vm_id,timestamp_s,cpu_pct CSV (plain or .gz)")
	capSpec := fs.String("capacity", "", "host capacity: cpu=X[,mem=Y], X and Y in the trace's unit or N% of the sum of the VMs' peaks")
	fs.StringVar(&o.SLAFile, "sla", "", "SLA file (YAML: default, vms; amounts in the trace's unit)")
	outFile := fs.String("out", "", "write vm_id,timestamp_s,usage,demand,allocation,floor,ceiling,priority,borrowed,lent,throttled here")
	fs.StringVar(&o.Model, "model", "ars", "predictor model ("+strings.Join(predictor.ModelNames(), ", ")+")")
	fs.Float64Var(&o.Target, "target-violation", 0.02, "the predictor's target violation rate")
	fs.IntVar(&o.MaxVMs, "vms", 0, "replay only the first N VMs (0: all)")
	fs.IntVar(&o.MaxSteps, "steps", 0, "replay only the first N grid steps (0: all)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("simulate: unexpected argument %q", fs.Arg(0))
	}
	if o.Trace == "" || *capSpec == "" || *outFile == "" {
		return errors.New("simulate: --trace, --capacity and --out are required")
	}
	var err error
	if o.Capacity, err = parseSimCapacity(*capSpec); err != nil {
		return fmt.Errorf("simulate: --capacity: %w", err)
	}
	f, err := os.Create(*outFile)
	if err != nil {
		return err
	}
	bw := bufio.NewWriterSize(f, 1<<20)
	o.Rows = bw
	t0 := time.Now()
	res, err := runSimulation(o)
	if err == nil {
		err = bw.Flush()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "trace %s: %s\n", o.Trace, res.Report)
	res.WriteSummary(out)
	fmt.Fprintf(out, "\nwrote %d rows to %s in %v\n", res.Rows, *outFile, time.Since(t0).Round(time.Millisecond))
	return nil
}

// simCap is one --capacity entry.
type simCap struct {
	Value   float64
	Percent bool
}

// simOptions configure runSimulation.
type simOptions struct {
	Trace    string
	Capacity map[synthesizer.Resource]simCap
	SLAFile  string
	Model    string
	Target   float64
	MaxVMs   int
	MaxSteps int
	Rows     io.Writer // nil: no rows
}

func parseSimCapacity(s string) (map[synthesizer.Resource]simCap, error) {
	out := map[synthesizer.Resource]simCap{}
	for _, part := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(part), "=")
		if !ok {
			return nil, fmt.Errorf("%q: want resource=amount", part)
		}
		var r synthesizer.Resource
		switch k {
		case "cpu":
			r = synthesizer.CPU
		case "mem":
			r = synthesizer.Memory
		default:
			return nil, fmt.Errorf("unknown resource %q (want cpu or mem)", k)
		}
		if _, dup := out[r]; dup {
			return nil, fmt.Errorf("%s given twice", k)
		}
		c := simCap{}
		if strings.HasSuffix(v, "%") {
			c.Percent, v = true, strings.TrimSuffix(v, "%")
		}
		x, err := strconv.ParseFloat(v, 64)
		if err != nil || math.IsNaN(x) || math.IsInf(x, 0) || x <= 0 {
			return nil, fmt.Errorf("%s: %q is not a positive amount", k, v)
		}
		if c.Percent && x > 1000 {
			return nil, fmt.Errorf("%s: %v%% is above 1000%%", k, x)
		}
		c.Value = x
		out[r] = c
	}
	if _, ok := out[synthesizer.CPU]; !ok {
		return nil, errors.New("cpu=... is required")
	}
	return out, nil
}

// classStats are one priority class's totals (or the fleet's).
type classStats struct {
	VMs                     int
	Steps                   int     // VM-steps
	Violations              int     // usage > allocation
	SumUsage, SumSlack      float64 // Σ usage, Σ max(alloc − usage, 0)
	SumShort                float64 // Σ max(usage − alloc, 0)
	ContSteps, ContShort    int     // VM-steps in contention, and those with allocation < demand
	BorrowSteps, LendSteps  int
	ThrottledSteps          int
	StaticViol, EqualViol   int
	StaticSlack, EqualSlack float64
}

func (c *classStats) rate(n int) float64 {
	if c.Steps == 0 {
		return 0
	}
	return float64(n) / float64(c.Steps)
}

func rel(x, u float64) float64 {
	if u == 0 {
		return 0
	}
	return x / u
}

// simResult is what runSimulation found.
type simResult struct {
	Report       string
	Resources    []synthesizer.Resource
	Capacity     map[synthesizer.Resource]float64 // in the trace's unit
	Scale        map[synthesizer.Resource]float64 // internal units per trace unit
	VMs          []string
	Steps        int
	StepSeconds  int64
	Rows         int
	Class        map[synthesizer.Resource]map[synthesizer.Class]*classStats
	All          map[synthesizer.Resource]*classStats
	ContSteps    map[synthesizer.Resource]int // grid steps where Σ demand > capacity
	Loans        int                          // loan-steps (open loans summed over steps)
	Alerts       int
	Changes      int
	MaxPlan      time.Duration
	MaxAllocFrac float64 // max over steps of Σ cpu allocation / capacity
}

func runSimulation(o simOptions) (*simResult, error) {
	if o.Model == "" {
		o.Model = "ars"
	}
	if o.Target == 0 {
		o.Target = 0.02
	}
	res := &simResult{Capacity: map[synthesizer.Resource]float64{}, Scale: map[synthesizer.Resource]float64{},
		Class: map[synthesizer.Resource]map[synthesizer.Class]*classStats{}, All: map[synthesizer.Resource]*classStats{}, ContSteps: map[synthesizer.Resource]int{}}
	// Load the series of each resource.
	resources := []synthesizer.Resource{synthesizer.CPU}
	if _, ok := o.Capacity[synthesizer.Memory]; ok {
		resources = append(resources, synthesizer.Memory)
	}
	res.Resources = resources
	var names []string
	var t0, step int64
	var nSteps int
	usage := map[synthesizer.Resource][][]float64{}
	for _, r := range resources {
		pr := predictor.CPU
		if r == synthesizer.Memory {
			pr = predictor.Mem
		}
		series, rep, err := predictor.LoadTrace(o.Trace, pr)
		if err != nil {
			return nil, err
		}
		if len(series) == 0 {
			return nil, errors.New("simulate: no series with at least 2 usable rows")
		}
		if o.MaxVMs > 0 && len(series) > o.MaxVMs {
			series = series[:o.MaxVMs]
		}
		if r == synthesizer.CPU {
			res.Report = rep.String()
			step = max(rep.StepSeconds, 1)
			t0 = series[0].T[0]
			tEnd := series[0].T[len(series[0].T)-1]
			for _, s := range series {
				t0, tEnd = min(t0, s.T[0]), max(tEnd, s.T[len(s.T)-1])
				names = append(names, s.VM)
			}
			nSteps = int((tEnd-t0)/step) + 1
			if o.MaxSteps > 0 && nSteps > o.MaxSteps {
				nSteps = o.MaxSteps
			}
		} else if len(series) != len(names) {
			return nil, fmt.Errorf("simulate: %d VMs have cpu but %d have mem", len(names), len(series))
		}
		u := make([][]float64, len(series))
		for i, s := range series {
			if s.VM != names[i] {
				return nil, fmt.Errorf("simulate: VM order differs between cpu and mem (%s vs %s)", names[i], s.VM)
			}
			u[i] = make([]float64, nSteps)
			j := 0
			last := 0.0
			for k := 0; k < nSteps; k++ {
				tk := t0 + int64(k)*step + step/2
				for j < len(s.T) && s.T[j] <= tk {
					last = s.V[j]
					j++
				}
				if j > 0 {
					u[i][k] = last
				}
			}
		}
		usage[r] = u
	}
	n := len(names)
	res.VMs, res.Steps, res.StepSeconds = names, nSteps, step

	// Capacity and internal scale.
	var capa synthesizer.Capacity
	capInt := map[synthesizer.Resource]int64{}
	for _, r := range resources {
		c := o.Capacity[r]
		v := c.Value
		if c.Percent {
			sum := 0.0
			for _, u := range usage[r] {
				pk := 0.0
				for _, x := range u {
					pk = max(pk, x)
				}
				sum += pk
			}
			v = sum * c.Value / 100
		}
		if !(v > 0) {
			return nil, fmt.Errorf("simulate: %s capacity is %v (the VMs' peaks sum to 0?)", r, v)
		}
		scale := math.Pow(10, math.Floor(5-math.Log10(v)))
		res.Capacity[r], res.Scale[r] = v, scale
		capInt[r] = int64(math.Floor(v * scale))
		capa.Set(r, capInt[r], 0)
	}

	// SLAs.
	slas, err := simSLAs(o.SLAFile, names, resources, capInt, res.Scale)
	if err != nil {
		return nil, err
	}

	// Models.
	pcfg := predictor.DefaultConfig()
	pcfg.Model, pcfg.TargetViolation = o.Model, o.Target
	models := map[synthesizer.Resource][]predictor.Model{}
	for _, r := range resources {
		ms := make([]predictor.Model, n)
		for i := range ms {
			if ms[i], err = predictor.New(pcfg, time.Duration(step)*time.Second); err != nil {
				return nil, err
			}
		}
		models[r] = ms
	}

	now := time.Unix(t0, 0)
	cfg := synthesizer.DefaultPlannerConfig()
	for r := range cfg.Step {
		cfg.Step[r] = 1
	}
	cfg.GrowHeadroom = 0 // the forecast's calibrated margin is the headroom
	cfg.MinDwell = 2 * time.Duration(step) * time.Second
	pl, err := synthesizer.NewPlanner(cfg, func() time.Time { return now })
	if err != nil {
		return nil, err
	}
	vms := make([]synthesizer.VMInput, n)
	for i := range vms {
		vms[i].Name, vms[i].SLA = names[i], slas[i]
	}

	// Per resource: stats per class, and the static allocations
	// (proportional to floors, and equal).
	sumFloor := map[synthesizer.Resource]float64{}
	for _, r := range resources {
		res.Class[r] = map[synthesizer.Class]*classStats{}
		res.All[r] = &classStats{VMs: n}
		for i := range vms {
			f, _, _ := slas[i].Bounds(r)
			sumFloor[r] += float64(f)
			c := slas[i].Class.Norm()
			if res.Class[r][c] == nil {
				res.Class[r][c] = &classStats{}
			}
			res.Class[r][c].VMs++
		}
	}
	cpuCap := float64(capInt[synthesizer.CPU])

	var w *bufio.Writer
	if o.Rows != nil {
		w = bufio.NewWriterSize(o.Rows, 1<<16)
		fmt.Fprintln(w, "vm_id,timestamp_s,usage,demand,allocation,floor,ceiling,priority,borrowed,lent,throttled")
	}
	cs := res.Scale[synthesizer.CPU]
	fmtv := func(x int64) string { return strconv.FormatFloat(float64(x)/cs, 'g', 10, 64) }
	for k := 0; k < nSteps; k++ {
		now = time.Unix(t0+int64(k)*step, 0)
		for _, r := range resources {
			sc := res.Scale[r]
			for i := range vms {
				if k == 0 {
					vms[i].Required[r] = -1
					continue
				}
				f, _ := models[r][i].Forecast()
				vms[i].Required[r] = int64(math.Ceil(f.Alloc * sc))
			}
		}
		t := time.Now()
		plan, err := pl.Plan(vms, capa)
		if err != nil {
			return nil, fmt.Errorf("simulate: step %d: %w", k, err)
		}
		res.MaxPlan = max(res.MaxPlan, time.Since(t))
		res.Changes += len(plan.Changes)
		res.Alerts += len(plan.Alerts)
		res.Loans += len(plan.Loans)
		for _, r := range resources {
			var allocSum, demandSum int64
			for i := range vms {
				demandSum += plan.VMs[i].Required[r]
				allocSum += plan.VMs[i].Target[r]
			}
			if r == synthesizer.CPU {
				res.MaxAllocFrac = max(res.MaxAllocFrac, float64(allocSum)/cpuCap)
			}
			contention := demandSum > capInt[r]
			if contention {
				res.ContSteps[r]++
			}
			sc, cr := res.Scale[r], float64(capInt[r])
			for i := range vms {
				vr := &plan.VMs[i]
				f, _, _ := slas[i].Bounds(r)
				u := usage[r][i][k]
				a := float64(vr.Target[r]) / sc
				static := cr * float64(f) / sumFloor[r] / sc
				equal := cr / float64(n) / sc
				for _, st := range []*classStats{res.Class[r][slas[i].Class.Norm()], res.All[r]} {
					st.Steps++
					st.SumUsage += u
					st.SumSlack += max(a-u, 0)
					st.SumShort += max(u-a, 0)
					if u > a {
						st.Violations++
					}
					if u > static {
						st.StaticViol++
					}
					if u > equal {
						st.EqualViol++
					}
					st.StaticSlack += max(static-u, 0)
					st.EqualSlack += max(equal-u, 0)
					if contention {
						st.ContSteps++
						if vr.Throttled[r] {
							st.ContShort++
						}
					}
					if vr.Borrowed[r] > 0 {
						st.BorrowSteps++
					}
					if vr.Lent[r] > 0 {
						st.LendSteps++
					}
					if vr.Throttled[r] {
						st.ThrottledSteps++
					}
				}
			}
		}
		if w != nil {
			for i := range vms {
				vr, s := &plan.VMs[i], &slas[i]
				thr := 0
				if vr.Throttled[synthesizer.CPU] {
					thr = 1
				}
				fmt.Fprintf(w, "%s,%d,%s,%s,%s,%s,%s,%s:%d,%s,%s,%d\n", names[i], now.Unix(),
					strconv.FormatFloat(usage[synthesizer.CPU][i][k], 'g', 10, 64), fmtv(vr.Required[synthesizer.CPU]), fmtv(vr.Target[synthesizer.CPU]),
					fmtv(s.CPU.FloorMillicores), fmtv(s.CPU.CeilingMillicores), s.Class.Norm(), s.Priority,
					fmtv(vr.Borrowed[synthesizer.CPU]), fmtv(vr.Lent[synthesizer.CPU]), thr)
				res.Rows++
			}
		}
		// Fake actuators: the plan is applied; then the step's usage is
		// observed.
		for i := range vms {
			vms[i].Current = plan.VMs[i].Target
		}
		for _, r := range resources {
			for i := range vms {
				if err := models[r][i].Observe(usage[r][i][k]); err != nil {
					return nil, fmt.Errorf("simulate: %s step %d: %w", names[i], k, err)
				}
			}
		}
	}
	if w != nil {
		if err := w.Flush(); err != nil {
			return nil, err
		}
	}
	return res, nil
}

// simSLAs builds each VM's SLA in internal units.
func simSLAs(file string, names []string, resources []synthesizer.Resource, capInt map[synthesizer.Resource]int64, scale map[synthesizer.Resource]float64) ([]synthesizer.SLA, error) {
	var fleet synthesizer.Fleet
	if file != "" {
		f, err := os.Open(file)
		if err != nil {
			return nil, err
		}
		fleet, err = synthesizer.ParseFleet(f)
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("simulate: %s: %w", file, err)
		}
		known := map[string]bool{}
		for _, n := range names {
			known[n] = true
		}
		for n := range fleet.VMs {
			if !known[n] {
				return nil, fmt.Errorf("simulate: %s: vm %s is not in the trace", file, n)
			}
		}
	}
	classes := synthesizer.Classes()
	weight := map[synthesizer.Class]float64{synthesizer.Critical: 3, synthesizer.Standard: 2, synthesizer.BestEffort: 1}
	var sumW float64
	for k := range names {
		sumW += weight[classes[k%3]]
	}
	out := make([]synthesizer.SLA, len(names))
	for k, n := range names {
		if s, ok := fleet.VMs[n]; ok {
			out[k] = scaleSLA(s, scale)
			continue
		}
		if fleet.Default != nil {
			out[k] = scaleSLA(*fleet.Default, scale)
			continue
		}
		c := classes[k%3]
		s := synthesizer.SLA{Class: c, Priority: (k / 3) % 10}
		floor := func(r synthesizer.Resource) int64 {
			return max(10, int64(0.5*float64(capInt[r])*weight[c]/sumW))
		}
		s.CPU = synthesizer.CPUSLA{FloorMillicores: floor(synthesizer.CPU), CeilingMillicores: capInt[synthesizer.CPU]}
		for _, r := range resources {
			if r == synthesizer.Memory {
				s.Memory = synthesizer.MemorySLA{FloorMiB: floor(r), CeilingMiB: capInt[r]}
			}
		}
		out[k] = s
	}
	return out, nil
}

func scaleSLA(s synthesizer.SLA, scale map[synthesizer.Resource]float64) synthesizer.SLA {
	c := scale[synthesizer.CPU]
	s.CPU.FloorMillicores = int64(math.Round(float64(s.CPU.FloorMillicores) * c))
	s.CPU.CeilingMillicores = int64(math.Round(float64(s.CPU.CeilingMillicores) * c))
	if m, ok := scale[synthesizer.Memory]; ok {
		s.Memory.FloorMiB = int64(math.Round(float64(s.Memory.FloorMiB) * m))
		s.Memory.CeilingMiB = int64(math.Round(float64(s.Memory.CeilingMiB) * m))
	} else {
		s.Memory = synthesizer.MemorySLA{}
	}
	s.Disk, s.Network = synthesizer.DiskSLA{}, synthesizer.NetworkSLA{}
	return s
}

// WriteSummary prints a per-class table for each resource, with the
// static baselines.
func (r *simResult) WriteSummary(out io.Writer) {
	fmt.Fprintf(out, "%d VMs × %d steps of %ds; cpu capacity %.6g (trace unit)", len(r.VMs), r.Steps, r.StepSeconds, r.Capacity[synthesizer.CPU])
	if m, ok := r.Capacity[synthesizer.Memory]; ok {
		fmt.Fprintf(out, ", mem capacity %.6g", m)
	}
	fmt.Fprintf(out, "\n%d changes, %d throttle alerts, %d loan-steps (all resources); max Σ cpu allocation/capacity %.4f; slowest plan %v\n",
		r.Changes, r.Alerts, r.Loans, r.MaxAllocFrac, r.MaxPlan.Round(time.Microsecond))
	for _, res := range r.Resources {
		name := "cpu"
		if res == synthesizer.Memory {
			name = "mem"
		}
		fmt.Fprintf(out, "\n%s: contention (Σ demand > capacity) on %d of %d steps\n", name, r.ContSteps[res], r.Steps)
		tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "class\tVMs\tviolations\tslack\tshortfall\tshort@contention\tborrowing\tlending\tthrottled\tstatic∝floor viol\tslack\tstatic equal viol\tslack\t")
		row := func(name string, c *classStats) {
			cont := 0.0
			if c.ContSteps > 0 {
				cont = float64(c.ContShort) / float64(c.ContSteps)
			}
			fmt.Fprintf(tw, "%s\t%d\t%.2f%%\t%.3f\t%.4f\t%.2f%%\t%.2f%%\t%.2f%%\t%.2f%%\t%.2f%%\t%.3f\t%.2f%%\t%.3f\t\n", name, c.VMs,
				100*c.rate(c.Violations), rel(c.SumSlack, c.SumUsage), rel(c.SumShort, c.SumUsage), 100*cont,
				100*c.rate(c.BorrowSteps), 100*c.rate(c.LendSteps), 100*c.rate(c.ThrottledSteps),
				100*c.rate(c.StaticViol), rel(c.StaticSlack, c.SumUsage), 100*c.rate(c.EqualViol), rel(c.EqualSlack, c.SumUsage))
		}
		for _, c := range synthesizer.Classes() {
			if s := r.Class[res][c]; s != nil {
				row(string(c), s)
			}
		}
		row("all", r.All[res])
		tw.Flush()
	}
	fmt.Fprintln(out, "\nviolations: share of VM-steps with usage > allocation; slack: Σ max(allocation − usage, 0) / Σ usage; shortfall: Σ max(usage − allocation, 0) / Σ usage;\nshort@contention: share of VM-steps on contended steps where the allocation is below the forecast demand; borrowing/lending/throttled: share of VM-steps.")
}
