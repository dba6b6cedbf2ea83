//go:build linux

package telemetry

import (
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
)

var (
	runqDelayDesc = prometheus.NewDesc("ars_vcpu_runqueue_delay_seconds",
		"Run-queue delay of a vCPU thread: from wakeup or preemption to on-CPU (eBPF, log2 buckets).", []string{"vm", "vcpu"}, nil)
	onCPUDesc = prometheus.NewDesc("ars_vcpu_oncpu_seconds_total",
		"Time a vCPU thread spent on a CPU (eBPF).", []string{"vm", "vcpu"}, nil)
	involDesc = prometheus.NewDesc("ars_vcpu_involuntary_switches_total",
		"Switches out of a vCPU thread while it was still runnable (eBPF).", []string{"vm", "vcpu"}, nil)
	wakeupsDesc = prometheus.NewDesc("ars_vcpu_wakeups_total",
		"Wakeups of a vCPU thread (eBPF).", []string{"vm", "vcpu"}, nil)
	kvmExitsDesc = prometheus.NewDesc("ars_vcpu_kvm_exits_total",
		"VM exits of a vCPU thread (eBPF tp_btf/kvm_exit; 0 without KVM).", []string{"vm", "vcpu"}, nil)
	faultExcDesc = prometheus.NewDesc("ars_vm_page_fault_exceptions_total",
		"Page-fault exceptions of a VM's QEMU process by CPU mode (eBPF page_fault_user/kernel).", []string{"vm", "mode"}, nil)
	faultsDesc = prometheus.NewDesc("ars_vm_page_faults_total",
		"Page faults of a VM's QEMU process by type, the kernel's own accounting (/proc/PID/stat).", []string{"vm", "type"}, nil)
	ioLatDesc = prometheus.NewDesc("ars_vm_block_io_latency_seconds",
		"Block request latency, issue to completion, of requests a VM's QEMU submitted (eBPF, log2 buckets).", []string{"vm", "dir"}, nil)
	ioBytesDesc = prometheus.NewDesc("ars_vm_block_io_bytes_total",
		"Bytes of block requests a VM's QEMU submitted (eBPF).", []string{"vm", "dir"}, nil)
	netBytesDesc = prometheus.NewDesc("ars_vm_net_bytes_total",
		"Bytes through a VM's tap, host view (rx: sent by the guest).", []string{"vm", "tap", "dir"}, nil)
	netPacketsDesc = prometheus.NewDesc("ars_vm_net_packets_total",
		"Packets through a VM's tap, host view.", []string{"vm", "tap", "dir"}, nil)
	netDropsDesc = prometheus.NewDesc("ars_vm_net_drops_total",
		"Packets dropped on a VM's tap, host view.", []string{"vm", "tap", "dir"}, nil)
	probeUpDesc = prometheus.NewDesc("ars_bpf_probe_up",
		"1 when the eBPF probe is loaded and attached, 0 when it is off (disabled or failed; see the log).", []string{"probe"}, nil)
	progRunsDesc = prometheus.NewDesc("ars_bpf_program_runs_total",
		"Runs of an eBPF program (kernel BPF_STATS_RUN_TIME; 0 unless enabled).", []string{"probe", "program"}, nil)
	progTimeDesc = prometheus.NewDesc("ars_bpf_program_run_seconds_total",
		"Run time of an eBPF program (kernel BPF_STATS_RUN_TIME; 0 unless enabled).", []string{"probe", "program"}, nil)
	bpfErrDesc = prometheus.NewDesc("ars_bpf_errors_total",
		"In-kernel failures of the eBPF probes: events dropped, not numbers wrong.", []string{"probe", "kind"}, nil)
	sampleErrDesc = prometheus.NewDesc("ars_bpf_read_errors",
		"1 when the last read of telemetry for the scrape failed.", nil, nil)
)

// Describe implements prometheus.Collector.
func (t *Telemetry) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{runqDelayDesc, onCPUDesc, involDesc, wakeupsDesc, kvmExitsDesc,
		faultExcDesc, faultsDesc, ioLatDesc, ioBytesDesc, netBytesDesc, netPacketsDesc, netDropsDesc,
		probeUpDesc, progRunsDesc, progTimeDesc, bpfErrDesc, sampleErrDesc} {
		ch <- d
	}
}

// histBuckets turns log2 ns slots into cumulative Prometheus buckets with
// upper bounds in seconds, and the sum in seconds.
func histBuckets(hist [HistSlots]uint64) (map[float64]uint64, uint64) {
	b := make(map[float64]uint64, HistSlots-1)
	var cum uint64
	for i := 0; i < HistSlots-1; i++ { // the last slot is open-ended: +Inf
		cum += hist[i]
		_, hi := SlotBounds(i)
		b[hi/1e9] = cum
	}
	return b, cum + hist[HistSlots-1]
}

// Collect implements prometheus.Collector: one Sample, emitted as
// cumulative counters and histograms.
func (t *Telemetry) Collect(ch chan<- prometheus.Metric) {
	for _, st := range t.Status() {
		ch <- prometheus.MustNewConstMetric(probeUpDesc, prometheus.GaugeValue, b2f(st.Loaded), st.Name)
	}
	for _, p := range t.programs() {
		if s, err := p.prog.Stats(); err == nil {
			ch <- prometheus.MustNewConstMetric(progRunsDesc, prometheus.CounterValue, float64(s.RunCount), p.probe, p.name)
			ch <- prometheus.MustNewConstMetric(progTimeDesc, prometheus.CounterValue, s.Runtime.Seconds(), p.probe, p.name)
		}
	}
	t.collectErrors(ch)

	samples, err := t.Sample()
	ch <- prometheus.MustNewConstMetric(sampleErrDesc, prometheus.GaugeValue, b2f(err != nil))
	for _, s := range samples {
		vm := s.Name
		if vm == "" {
			vm = "slot" + strconv.Itoa(int(s.VMSlot))
		}
		for slot, v := range s.VCPUs {
			vcpu := strconv.Itoa(int(slot))
			buckets, count := histBuckets(v.Hist)
			ch <- prometheus.MustNewConstHistogram(runqDelayDesc, count, float64(v.RunDelayNs)/1e9, buckets, vm, vcpu)
			ch <- prometheus.MustNewConstMetric(onCPUDesc, prometheus.CounterValue, float64(v.OnCPUNs)/1e9, vm, vcpu)
			ch <- prometheus.MustNewConstMetric(involDesc, prometheus.CounterValue, float64(v.Involuntary), vm, vcpu)
			ch <- prometheus.MustNewConstMetric(wakeupsDesc, prometheus.CounterValue, float64(v.Wakeups), vm, vcpu)
		}
		for slot, n := range s.KVMExits {
			ch <- prometheus.MustNewConstMetric(kvmExitsDesc, prometheus.CounterValue, float64(n), vm, strconv.Itoa(int(slot)))
		}
		if t.Faults != nil {
			ch <- prometheus.MustNewConstMetric(faultExcDesc, prometheus.CounterValue, float64(s.Faults.User), vm, "user")
			ch <- prometheus.MustNewConstMetric(faultExcDesc, prometheus.CounterValue, float64(s.Faults.Kernel), vm, "kernel")
		}
		if s.PID > 0 {
			ch <- prometheus.MustNewConstMetric(faultsDesc, prometheus.CounterValue, float64(s.Faults.Minor), vm, "minor")
			ch <- prometheus.MustNewConstMetric(faultsDesc, prometheus.CounterValue, float64(s.Faults.Major), vm, "major")
		}
		if t.BlockIO != nil && s.PID > 0 {
			for d, dir := range []string{"read", "write", "other"} {
				buckets, count := histBuckets(s.IO.Hist[d])
				ch <- prometheus.MustNewConstHistogram(ioLatDesc, count, float64(s.IO.LatencyNs[d])/1e9, buckets, vm, dir)
				ch <- prometheus.MustNewConstMetric(ioBytesDesc, prometheus.CounterValue, float64(s.IO.Bytes[d]), vm, dir)
			}
		}
		for tap, n := range s.Net {
			ch <- prometheus.MustNewConstMetric(netBytesDesc, prometheus.CounterValue, float64(n.RxBytes), vm, tap, "rx")
			ch <- prometheus.MustNewConstMetric(netBytesDesc, prometheus.CounterValue, float64(n.TxBytes), vm, tap, "tx")
			ch <- prometheus.MustNewConstMetric(netPacketsDesc, prometheus.CounterValue, float64(n.RxPackets), vm, tap, "rx")
			ch <- prometheus.MustNewConstMetric(netPacketsDesc, prometheus.CounterValue, float64(n.TxPackets), vm, tap, "tx")
			ch <- prometheus.MustNewConstMetric(netDropsDesc, prometheus.CounterValue, float64(n.RxDropped), vm, tap, "rx")
			ch <- prometheus.MustNewConstMetric(netDropsDesc, prometheus.CounterValue, float64(n.TxDropped), vm, tap, "tx")
		}
	}
}

func (t *Telemetry) collectErrors(ch chan<- prometheus.Metric) {
	emit := func(probe, kind string, n uint64) {
		ch <- prometheus.MustNewConstMetric(bpfErrDesc, prometheus.CounterValue, float64(n), probe, kind)
	}
	if t.Runq != nil {
		if e, err := t.Runq.Errors(); err == nil {
			emit(ProbeSched, "no_state", e.NoState)
			emit(ProbeSched, "map_missing_entry", e.NoStats)
			emit(ProbeSched, "clock", e.Clock)
			emit(ProbeSched, "ringbuf_full", e.Ringbuf)
		}
	}
	if t.Faults != nil {
		if n, err := t.Faults.Errors(); err == nil {
			emit(ProbeFaults, "map_missing_entry", n)
		}
	}
	if t.BlockIO != nil {
		if e, err := t.BlockIO.Errors(); err == nil {
			emit(ProbeBlockIO, "map_full", e.InflightFull)
			emit(ProbeBlockIO, "map_missing_entry", e.NoStats)
			emit(ProbeBlockIO, "not_issued", e.NotIssued)
		}
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

var _ prometheus.Collector = (*Telemetry)(nil)
