package metrics

import (
	"runtime"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ars-dev/ars/agent/status"
)

func TestCollectorGolden(t *testing.T) {
	var b status.Board
	b.Publish(status.Snapshot{
		Tick: 7, Generation: 3, Drifts: 2, AuditRotated: "/var/lib/ars/audit.log.unverified-x",
		VMs: []status.VM{{
			Name: "web", UsageMillicores: 500, DemandMillicores: 750, ForecastMillicores: 600,
			AllocMillicores: 800, FloorMillicores: 200, CeilingMillicores: 1500, ThrottledPeriods: 4,
			RunqValid: true, RunqMeanNs: 2e6, RunqP99Ns: 8e6,
			PredErrMillicores: 120, Violations: 3, RecentViolation: 0.05,
		}, {Name: "idle", AllocMillicores: 200, FloorMillicores: 200, CeilingMillicores: 1500}},
		Actions: map[string]uint64{"cpu.quota/applied": 5},
	})
	want := `
# HELP ars_actions_total Executor actions by kind and outcome.
# TYPE ars_actions_total counter
ars_actions_total{kind="cpu.quota",outcome="applied"} 5
# HELP ars_vm_cpu_allocation_cores CPU allocation in force (cgroup quota), in cores.
# TYPE ars_vm_cpu_allocation_cores gauge
ars_vm_cpu_allocation_cores{vm="idle"} 0.2
ars_vm_cpu_allocation_cores{vm="web"} 0.8
# HELP ars_vm_runqueue_delay_p99_seconds p99 run-queue delay of the VM's vCPU threads over the last tick (eBPF).
# TYPE ars_vm_runqueue_delay_p99_seconds gauge
ars_vm_runqueue_delay_p99_seconds{vm="web"} 0.008
# HELP ars_vm_cpu_demand_cores Estimated CPU demand (usage corrected for throttling), in cores.
# TYPE ars_vm_cpu_demand_cores gauge
ars_vm_cpu_demand_cores{vm="idle"} 0
ars_vm_cpu_demand_cores{vm="web"} 0.75
# HELP ars_vm_cpu_violations_total Ticks in which the VM's CPU demand exceeded the allocation in force.
# TYPE ars_vm_cpu_violations_total counter
ars_vm_cpu_violations_total{vm="idle"} 0
ars_vm_cpu_violations_total{vm="web"} 3
# HELP ars_vm_cpu_prediction_error_cores Absolute error of the last tick's CPU forecast (p50) against the demand seen, in cores.
# TYPE ars_vm_cpu_prediction_error_cores gauge
ars_vm_cpu_prediction_error_cores{vm="idle"} 0
ars_vm_cpu_prediction_error_cores{vm="web"} 0.12
# HELP ars_audit_verify_ok 1 when the audit log's hash chain verified at start, 0 when it did not and was moved aside.
# TYPE ars_audit_verify_ok gauge
ars_audit_verify_ok 0
# HELP ars_drifts_total Limits found changed behind ARS's back (audited, then repaired or adopted).
# TYPE ars_drifts_total counter
ars_drifts_total 2
# HELP ars_vms VMs managed by this agent.
# TYPE ars_vms gauge
ars_vms 2
# HELP ars_ticks_total Control loop ticks completed.
# TYPE ars_ticks_total counter
ars_ticks_total 7
# HELP ars_build_info Build information; always 1.
# TYPE ars_build_info gauge
ars_build_info{goversion="` + runtime.Version() + `",version="` + Version + `"} 1
`
	if err := testutil.CollectAndCompare(NewCollector(&b), strings.NewReader(want),
		"ars_actions_total", "ars_vm_cpu_allocation_cores", "ars_vm_runqueue_delay_p99_seconds",
		"ars_vm_cpu_demand_cores", "ars_vm_cpu_violations_total", "ars_vm_cpu_prediction_error_cores", "ars_audit_verify_ok", "ars_drifts_total", "ars_vms", "ars_ticks_total", "ars_build_info"); err != nil {
		t.Fatal(err)
	}
	if n := testutil.CollectAndCount(NewCollector(&b)); n != 2*16+2+10 {
		// 16 always-present per-VM series ×2, runq p99+mean for web; vms, audit, drifts, wakeups, actions, ticks, gen, build, overcommitted
		t.Fatalf("collected %d metrics", n)
	}
}
