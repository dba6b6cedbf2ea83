// Package metrics owns what arsd exposes to Prometheus: a collector that
// turns the control loop's latest status snapshot into ars_* metrics at
// scrape time, and the HTTP handler serving them.
package metrics

import (
	"runtime"
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
		ceilingDesc, throttledDesc, runqP99Desc, runqMeanDesc, predErrDesc, predMAEDesc, violationsDesc, violationRatioDesc, auditOKDesc, driftsDesc, wakeupsDesc, vmsDesc, actionsDesc, ticksDesc, genDesc, buildDesc} {
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
	}
	g(vmsDesc, float64(len(s.VMs)))
	auditOK := 1.0
	if s.AuditRotated != "" {
		auditOK = 0
	}
	g(auditOKDesc, auditOK)
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
