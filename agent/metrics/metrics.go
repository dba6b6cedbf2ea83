// Package metrics owns what arsd exposes to Prometheus: a collector that
// turns the control loop's latest status snapshot into ars_* metrics at
// scrape time, and the HTTP handler serving them.
package metrics

import (
	"runtime"
	"sort"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"net/http"

	"github.com/ars-dev/ars/agent/status"
)

// Version is reported in ars_build_info.
const Version = "0.1.0"

var (
	vmLabels  = []string{"vm"}
	usageDesc = prometheus.NewDesc("ars_vm_cpu_usage_cores",
		"CPU used by the VM's cgroup over the last tick, in cores.", vmLabels, nil)
	demandDesc = prometheus.NewDesc("ars_vm_cpu_demand_cores",
		"Estimated CPU demand (usage corrected for throttling), in cores.", vmLabels, nil)
	forecastDesc = prometheus.NewDesc("ars_vm_cpu_forecast_cores",
		"Forecast CPU demand (p50) for the next tick, in cores.", vmLabels, nil)
	allocDesc = prometheus.NewDesc("ars_vm_cpu_allocation_cores",
		"CPU allocation in force (cgroup quota), in cores.", vmLabels, nil)
	floorDesc = prometheus.NewDesc("ars_vm_cpu_floor_cores",
		"SLA guaranteed CPU floor, in cores.", vmLabels, nil)
	ceilingDesc = prometheus.NewDesc("ars_vm_cpu_ceiling_cores",
		"SLA CPU burst ceiling, in cores.", vmLabels, nil)
	throttledDesc = prometheus.NewDesc("ars_vm_cpu_throttled_periods",
		"CFS periods in which the VM was throttled during the last tick.", vmLabels, nil)
	runqP99Desc = prometheus.NewDesc("ars_vm_runqueue_delay_p99_seconds",
		"p99 run-queue delay of the VM's vCPU threads over the last tick (eBPF).", vmLabels, nil)
	runqMeanDesc = prometheus.NewDesc("ars_vm_runqueue_delay_mean_seconds",
		"Mean run-queue delay of the VM's vCPU threads over the last tick (eBPF).", vmLabels, nil)
	predErrDesc = prometheus.NewDesc("ars_vm_cpu_prediction_error_cores",
		"Absolute error of the last tick's CPU forecast (p50) against the demand seen, in cores.", vmLabels, nil)
	predMAEDesc = prometheus.NewDesc("ars_vm_cpu_prediction_mae_cores",
		"Mean absolute error of the CPU forecast (p50) since the VM was discovered, in cores.", vmLabels, nil)
	violationsDesc = prometheus.NewDesc("ars_vm_cpu_violations_total",
		"Ticks in which the VM's CPU demand exceeded the allocation in force.", vmLabels, nil)
	violationRatioDesc = prometheus.NewDesc("ars_vm_cpu_violation_ratio",
		"Share of recent ticks (EWMA over about 100) in which CPU demand exceeded the allocation.", vmLabels, nil)
	auditOKDesc = prometheus.NewDesc("ars_audit_verify_ok",
		"1 when the audit log's hash chain verified at start, 0 when it did not and was moved aside.", nil, nil)
	journalOKDesc = prometheus.NewDesc("ars_journal_verify_ok",
		"1 when the DRM journal opened and read at start, 0 when it was unreadable and moved aside (a new one was started).", nil, nil)
	driftsDesc = prometheus.NewDesc("ars_drifts_total",
		"Limits found changed behind ARS's back (audited, then repaired or adopted).", nil, nil)
	wakeupsDesc = prometheus.NewDesc("ars_loop_wakeups_total",
		"Control loop ticks run early on a vCPU run-queue delay spike.", nil, nil)
	vmsDesc = prometheus.NewDesc("ars_vms",
		"VMs managed by this agent.", nil, nil)
	actionsDesc = prometheus.NewDesc("ars_actions_total",
		"Executor actions by kind and outcome.", []string{"kind", "outcome"}, nil)
	ticksDesc = prometheus.NewDesc("ars_ticks_total",
		"Control loop ticks completed.", nil, nil)
	genDesc = prometheus.NewDesc("ars_drm_generation",
		"Generation number of the dynamic resource map.", nil, nil)
	requiredDesc = prometheus.NewDesc("ars_vm_cpu_required_cores",
		"CPU the forecast requires for the next tick, clamped to the SLA, in cores.", vmLabels, nil)
	resLabels    = []string{"vm", "resource"}
	borrowedDesc = prometheus.NewDesc("ars_vm_borrowed",
		"Amount the VM holds on loan from lower-priority VMs, in SLA units (cpu: cores, memory: bytes).", resLabels, nil)
	lentDesc = prometheus.NewDesc("ars_vm_lent",
		"Amount the VM has lent to higher-priority VMs, in SLA units (cpu: cores, memory: bytes).", resLabels, nil)
	vmThrottledDesc = prometheus.NewDesc("ars_vm_throttled",
		"1 when the host could not give the VM its required allocation this tick (kept at what it could get, never below the floor).", resLabels, nil)
	throttledTicksDesc = prometheus.NewDesc("ars_vm_throttled_ticks_total",
		"Ticks in which the VM got less than its required allocation.", resLabels, nil)
	loanDesc = prometheus.NewDesc("ars_loan",
		"Open loan between two VMs, in SLA units (cpu: cores, memory: bytes).", []string{"lender", "borrower", "resource"}, nil)
	allocatableDesc = prometheus.NewDesc("ars_host_allocatable",
		"Host capacity ARS shares out (total − reserved), in SLA units (cpu: cores, memory: bytes); 0 = not limited.", []string{"resource"}, nil)
	allocatedDesc = prometheus.NewDesc("ars_host_allocated",
		"Sum of the managed VMs' allocations after the last plan, in SLA units (cpu: cores, memory: bytes).", []string{"resource"}, nil)
	overcommitDesc = prometheus.NewDesc("ars_plan_overcommitted",
		"1 when the running VMs' SLA floors exceed the host's capacity (planned without the host limit).", nil, nil)
	memUsedDesc = prometheus.NewDesc("ars_vm_memory_used_bytes",
		"Memory the guest uses (total − available, from the balloon's guest statistics).", vmLabels, nil)
	memDemandDesc = prometheus.NewDesc("ars_vm_memory_demand_bytes",
		"Estimated memory demand (working set, pressure and major faults).", vmLabels, nil)
	memForecastDesc = prometheus.NewDesc("ars_vm_memory_forecast_bytes",
		"Forecast memory demand (p50) for the next tick.", vmLabels, nil)
	memAllocDesc = prometheus.NewDesc("ars_vm_memory_allocation_bytes",
		"Guest memory size in force (balloon actual).", vmLabels, nil)
	memFloorDesc = prometheus.NewDesc("ars_vm_memory_floor_bytes",
		"SLA guaranteed memory floor.", vmLabels, nil)
	memCeilingDesc = prometheus.NewDesc("ars_vm_memory_ceiling_bytes",
		"SLA memory ceiling (at most the VM's boot memory).", vmLabels, nil)
	buildDesc = prometheus.NewDesc("ars_build_info",
		"Build information; always 1.", []string{"version", "goversion"}, nil)
)

// Collector exports a status board.
type Collector struct{ board *status.Board }

// NewCollector returns a collector reading board at scrape time.
func NewCollector(board *status.Board) *Collector { return &Collector{board: board} }

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{usageDesc, demandDesc, forecastDesc, allocDesc, floorDesc,
		ceilingDesc, throttledDesc, runqP99Desc, runqMeanDesc, predErrDesc, predMAEDesc, violationsDesc, violationRatioDesc, auditOKDesc, journalOKDesc, driftsDesc, wakeupsDesc, vmsDesc, actionsDesc, ticksDesc, genDesc, buildDesc,
		requiredDesc, borrowedDesc, lentDesc, vmThrottledDesc, throttledTicksDesc, loanDesc, allocatableDesc, allocatedDesc, overcommitDesc,
		memUsedDesc, memDemandDesc, memForecastDesc, memAllocDesc, memFloorDesc, memCeilingDesc} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	s := c.board.Latest()
	g := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	for _, vm := range s.VMs {
		g(usageDesc, vm.UsageMillicores/1000, vm.Name)
		g(demandDesc, vm.DemandMillicores/1000, vm.Name)
		g(forecastDesc, vm.ForecastMillicores/1000, vm.Name)
		g(allocDesc, float64(vm.AllocMillicores)/1000, vm.Name)
		g(floorDesc, float64(vm.FloorMillicores)/1000, vm.Name)
		g(ceilingDesc, float64(vm.CeilingMillicores)/1000, vm.Name)
		g(throttledDesc, float64(vm.ThrottledPeriods), vm.Name)
		g(predErrDesc, vm.PredErrMillicores/1000, vm.Name)
		g(predMAEDesc, vm.PredMAEMillicores/1000, vm.Name)
		ch <- prometheus.MustNewConstMetric(violationsDesc, prometheus.CounterValue, float64(vm.Violations), vm.Name)
		g(violationRatioDesc, vm.RecentViolation, vm.Name)
		if vm.RunqValid {
			g(runqP99Desc, vm.RunqP99Ns/1e9, vm.Name)
			g(runqMeanDesc, vm.RunqMeanNs/1e9, vm.Name)
		}
		g(requiredDesc, float64(vm.RequiredMillicores)/1000, vm.Name)
		g(borrowedDesc, float64(vm.BorrowedMillicores)/1000, vm.Name, "cpu")
		g(lentDesc, float64(vm.LentMillicores)/1000, vm.Name, "cpu")
		g(vmThrottledDesc, b2f(vm.ThrottledCPU), vm.Name, "cpu")
		ch <- prometheus.MustNewConstMetric(throttledTicksDesc, prometheus.CounterValue, float64(s.Throttled[vm.Name+"/cpu"]), vm.Name, "cpu")
		if vm.MemAllocMiB > 0 {
			g(memUsedDesc, vm.MemUsedMiB*mib, vm.Name)
			g(memDemandDesc, vm.MemDemandMiB*mib, vm.Name)
			g(memForecastDesc, vm.MemForecastMiB*mib, vm.Name)
			g(memAllocDesc, float64(vm.MemAllocMiB)*mib, vm.Name)
			g(memFloorDesc, float64(vm.MemFloorMiB)*mib, vm.Name)
			g(memCeilingDesc, float64(vm.MemCeilingMiB)*mib, vm.Name)
			g(borrowedDesc, float64(vm.BorrowedMemMiB)*mib, vm.Name, "memory")
			g(lentDesc, float64(vm.LentMemMiB)*mib, vm.Name, "memory")
			g(vmThrottledDesc, b2f(vm.ThrottledMem), vm.Name, "memory")
			ch <- prometheus.MustNewConstMetric(throttledTicksDesc, prometheus.CounterValue, float64(s.Throttled[vm.Name+"/memory"]), vm.Name, "memory")
		}
	}
	for _, l := range s.Loans {
		g(loanDesc, unit(l.Resource, l.Amount), l.Lender, l.Borrower, l.Resource)
	}
	for _, c := range s.Capacity {
		g(allocatableDesc, unit(c.Resource, c.Allocatable), c.Resource)
		g(allocatedDesc, unit(c.Resource, c.Allocated), c.Resource)
	}
	g(overcommitDesc, b2f(s.PlanError != ""))
	g(vmsDesc, float64(len(s.VMs)))
	auditOK := 1.0
	if s.AuditRotated != "" {
		auditOK = 0
	}
	g(auditOKDesc, auditOK)
	g(journalOKDesc, b2f(s.JournalRotated == ""))
	ch <- prometheus.MustNewConstMetric(driftsDesc, prometheus.CounterValue, float64(s.Drifts))
	ch <- prometheus.MustNewConstMetric(wakeupsDesc, prometheus.CounterValue, float64(s.Wakeups))
	for k, v := range s.Actions {
		kind, outcome, _ := strings.Cut(k, "/")
		ch <- prometheus.MustNewConstMetric(actionsDesc, prometheus.CounterValue, float64(v), kind, outcome)
	}
	ch <- prometheus.MustNewConstMetric(ticksDesc, prometheus.CounterValue, float64(s.Tick))
	g(genDesc, float64(s.Generation))
	g(buildDesc, 1, Version, runtime.Version())
}

// Handler returns an HTTP handler serving the collector, the extra
// collectors (e.g. the eBPF telemetry's) and Go and process metrics, on a
// registry of its own.
func Handler(board *status.Board, extra ...prometheus.Collector) http.Handler {
	reg := prometheus.NewRegistry()
	reg.MustRegister(NewCollector(board), collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	reg.MustRegister(extra...)
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg})
}

const mib = 1 << 20

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// unit converts an amount in SLA units to the metric's base unit.
func unit(resource string, v int64) float64 {
	switch resource {
	case "cpu":
		return float64(v) / 1000 // millicores → cores
	case "memory":
		return float64(v) * mib // MiB → bytes
	}
	return float64(v)
}

// DescribeAll lists every metric the collectors describe, one line each,
// sorted: "name{labels} help". It is the golden metric set.
func DescribeAll(cs ...prometheus.Collector) string {
	ch := make(chan *prometheus.Desc, 256)
	go func() {
		for _, c := range cs {
			c.Describe(ch)
		}
		close(ch)
	}()
	var lines []string
	for d := range ch {
		lines = append(lines, descLine(d.String()))
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n") + "\n"
}

// descLine turns a Desc's String() — Desc{fqName: "x", help: "h",
// constLabels: {}, variableLabels: {a,b}} — into "x{a,b} h".
func descLine(s string) string {
	field := func(key, end string) string {
		_, rest, ok := strings.Cut(s, key)
		if !ok {
			return ""
		}
		v, _, _ := strings.Cut(rest, end)
		return v
	}
	help := field(`help: "`, `", constLabels`)
	if h, _, ok := strings.Cut(help, `", unit: "`); ok {
		help = h
	}
	return field(`fqName: "`, `"`) + "{" + field("variableLabels: {", "}") + "} " + help
}
