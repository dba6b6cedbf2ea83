//go:build linux

package telemetry

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/ars-dev/ars/internal/testutil"
)

// TestOpenDegradesPerProbe makes one probe fail with a real verifier error
// and disables another: the log carries the whole verifier log (%+v), the
// status and ars_bpf_probe_up say which probes are off, and the rest keep
// working.
func TestOpenDegradesPerProbe(t *testing.T) {
	testutil.RequireBTF(t)
	failProbe = func(probe string) error {
		if probe != ProbeFaults {
			return nil
		}
		// Reads a register never written: rejected by the verifier.
		_, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.SocketFilter, License: "GPL",
			Instructions: asm.Instructions{asm.Mov.Reg(asm.R0, asm.R5), asm.Return()}})
		if err == nil {
			return errors.New("expected a verifier error")
		}
		return fmt.Errorf("faults: load: %w", verifierDetail(err))
	}
	t.Cleanup(func() { failProbe = nil })
	var logBuf bytes.Buffer
	tel := Open(Config{Disable: []string{ProbeKVMExit}}, slog.New(slog.NewTextHandler(&logBuf, nil)))
	t.Cleanup(func() { tel.Close() })

	st := map[string]ProbeStatus{}
	for _, s := range tel.Status() {
		t.Log(s)
		st[s.Name] = s
	}
	var ve *ebpf.VerifierError
	if s := st[ProbeFaults]; s.Loaded || !errors.As(s.Err, &ve) {
		t.Errorf("faults: %v, want off with a verifier error", s)
	}
	if s := st[ProbeKVMExit]; s.Loaded || s.Enabled || s.Err != nil {
		t.Errorf("kvm_exit: %+v, want disabled", s)
	}
	if !st[ProbeSched].Loaded || !st[ProbeBlockIO].Loaded {
		t.Errorf("the other probes should be on: %v", tel.Status())
	}
	log := logBuf.String()
	if !strings.Contains(log, "probe=faults") || !strings.Contains(log, "R5 !read_ok") {
		t.Errorf("log lacks the probe or the verifier log:\n%s", log)
	}
	if tel.Faults != nil {
		t.Error("Faults set although off")
	}
	// Everything else still works, and the metrics say what is off.
	if err := tel.TrackVM(1, VMRef{Name: "x", PID: 1}); err != nil {
		t.Fatal(err)
	}
	if _, err := tel.Sample(); err != nil {
		t.Fatal(err)
	}
	fams := gather(t, tel)
	for _, m := range fams["ars_bpf_probe_up"].GetMetric() {
		want := map[string]float64{ProbeSched: 1, ProbeFaults: 0, ProbeBlockIO: 1, ProbeKVMExit: 0}[label(m, "probe")]
		if m.GetGauge().GetValue() != want {
			t.Errorf("ars_bpf_probe_up{probe=%q} = %v, want %v", label(m, "probe"), m.GetGauge().GetValue(), want)
		}
	}
}

// TestCollector tracks a helper process as a VM (with its main thread as
// vCPU 0 and "lo" as its tap), makes it fault and do block I/O, and checks
// the exported metrics through a pedantic registry (Describe and Collect
// consistent, histograms well formed): histograms in seconds, counters,
// per-program run statistics and in-kernel error counters.
func TestCollector(t *testing.T) {
	testutil.RequireBTF(t)
	losetup := testutil.RequireCommand(t, "losetup")
	tel := Open(Config{ProgramStats: true}, nil)
	t.Cleanup(func() { tel.Close() })
	dev := newLoopDevice(t, losetup, 4<<20)
	h := startHelper(t)
	if err := tel.TrackVM(2, VMRef{Name: "helper", PID: h.pid(), Taps: []string{"lo"}}); err != nil {
		t.Fatal(err)
	}
	for i, tid := range threadsOfPID(h.pid()) {
		if err := tel.Track(tid, 2, uint32(i)); err != nil {
			t.Fatal(err)
		}
	}
	h.do(t, "touch 512")
	h.do(t, "io "+dev+" 20 10")
	time.Sleep(50 * time.Millisecond)

	fams := gather(t, tel)
	for _, name := range []string{"ars_vcpu_runqueue_delay_seconds", "ars_vcpu_oncpu_seconds_total", "ars_vcpu_wakeups_total",
		"ars_vm_page_fault_exceptions_total", "ars_vm_page_faults_total", "ars_vm_block_io_latency_seconds",
		"ars_vm_block_io_bytes_total", "ars_vm_net_bytes_total", "ars_bpf_probe_up", "ars_bpf_program_runs_total",
		"ars_bpf_program_run_seconds_total", "ars_bpf_errors_total"} {
		if _, ok := fams[name]; !ok {
			t.Errorf("metric %s missing", name)
		}
	}
	for _, m := range fams["ars_vm_block_io_latency_seconds"].GetMetric() {
		if label(m, "vm") != "helper" {
			continue
		}
		h := m.GetHistogram()
		want := map[string]uint64{"read": 10, "write": 20, "other": 0}[label(m, "dir")]
		if h.GetSampleCount() < want || h.GetSampleCount() > want+2 {
			t.Errorf("io latency %s: count %d, want %d", label(m, "dir"), h.GetSampleCount(), want)
		}
		if want > 0 && (h.GetSampleSum() <= 0 || h.GetSampleSum() > 1) {
			t.Errorf("io latency %s: sum %v s: not in seconds?", label(m, "dir"), h.GetSampleSum())
		}
	}
	var runs float64
	for _, m := range fams["ars_bpf_program_runs_total"].GetMetric() {
		runs += m.GetCounter().GetValue()
	}
	if runs == 0 {
		t.Error("program run counts all 0 with ProgramStats on")
	}
	for _, m := range fams["ars_vm_page_faults_total"].GetMetric() {
		if label(m, "type") == "minor" && m.GetCounter().GetValue() < 512 {
			t.Errorf("minor faults %v < 512 pages touched", m.GetCounter().GetValue())
		}
	}
}

func gather(t *testing.T, c prometheus.Collector) map[string]*dto.MetricFamily {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	if err := reg.Register(c); err != nil {
		t.Fatal(err)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]*dto.MetricFamily{}
	for _, f := range mfs {
		out[f.GetName()] = f
	}
	return out
}

func label(m *dto.Metric, name string) string {
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

// BenchmarkSample is the agent's per-tick read for 10 VMs of 4 vCPUs (10
// sleeping processes standing in for QEMU, 4 threads each tracked as
// vCPUs, "lo" as each VM's tap): what one Sample costs in CPU time.
//
//	sudo go test -run '^$' -bench Sample -benchmem ./agent/telemetry/
func BenchmarkSample(b *testing.B) {
	testutil.RequireBTF(b)
	tel := Open(Config{}, nil)
	defer tel.Close()
	for i := range 10 {
		cmd := exec.Command("sleep", "600")
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		defer func() { cmd.Process.Kill(); cmd.Wait() }()
		if err := tel.TrackVM(uint32(i), VMRef{Name: fmt.Sprintf("vm%d", i), PID: cmd.Process.Pid, Taps: []string{"lo"}}); err != nil {
			b.Fatal(err)
		}
		for v := range 4 {
			// The process's one thread plus stand-in tids: what matters
			// is the number of map entries walked.
			tid := uint32(cmd.Process.Pid)
			if v > 0 {
				tid = uint32(4_000_000 + i*4 + v)
			}
			if err := tel.Track(tid, uint32(i), uint32(v)); err != nil {
				b.Fatal(err)
			}
		}
	}
	for b.Loop() {
		s, err := tel.Sample()
		if err != nil || len(s) != 10 {
			b.Fatalf("Sample: %d VMs, %v", len(s), err)
		}
	}
}
