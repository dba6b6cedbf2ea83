//go:build linux

package telemetry

import (
	"context"
	"encoding/json"
	"os/exec"
	"strconv"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ars-dev/ars/internal/testutil"
	"github.com/ars-dev/ars/internal/vm"
	"github.com/ars-dev/ars/internal/vmtest"
)

// TestVMSampleUnderHostStress boots a TCG guest (virtio disk cache=none,
// tap in its own netns), tracks it through Telemetry (the API the agent
// uses), and pins its vCPU thread to one CPU. With the guest busy and the
// CPU to itself, then with `stress-ng --cpu 4` pinned to the same CPU, it
// checks that:
//   - the vCPU's run-queue delay per second of wall time at least doubles
//     and exceeds 200 ms/s under stress (measured: 8-52 ms/s alone, once
//     215 with the host busy; 400-440 ms/s under stress);
//   - the untracked stress-ng threads never appear in the eBPF counters;
//   - the VM's Sample carries its guest's disk writes (block I/O reaches
//     the host block layer with cache=none), page faults and tap bytes;
//   - spike events arrive for the stressed vCPU.
func TestVMSampleUnderHostStress(t *testing.T) {
	testutil.RequireBTF(t)
	stressng := testutil.RequireCommand(t, "stress-ng")
	v := vmtest.Start(t, vm.Config{Name: "telem", VCPUs: 1, MemMiB: 192, Disk: true, Net: true})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	tel := Open(Config{SpikeThreshold: 2 * time.Millisecond, ProgramStats: true}, nil)
	t.Cleanup(func() {
		if err := tel.Close(); err != nil {
			t.Error(err)
		}
	})
	for _, st := range tel.Status() {
		t.Log(st)
		if st.Name != ProbeKVMExit && !st.Loaded {
			t.Fatalf("probe %s", st)
		}
	}
	raw, err := v.QMP(ctx, "query-cpus-fast", nil)
	if err != nil {
		t.Fatal(err)
	}
	var cpus []struct {
		Index    int `json:"cpu-index"`
		ThreadID int `json:"thread-id"`
	}
	if err := json.Unmarshal(raw, &cpus); err != nil || len(cpus) == 0 {
		t.Fatalf("query-cpus-fast: %s (%v)", raw, err)
	}
	const slot = 4
	if err := tel.TrackVM(slot, VMRef{Name: v.Name, PID: v.PID, NetNS: v.NetNS, Taps: []string{v.Tap}}); err != nil {
		t.Fatal(err)
	}
	vcpu := uint32(cpus[0].ThreadID)
	if err := tel.Track(vcpu, slot, 0); err != nil {
		t.Fatal(err)
	}

	// Pin the vCPU thread to one CPU; undone at cleanup (the guest is ours,
	// but keep the host tidy).
	cpu := lastAllowedCPU(t)
	var old, one unix.CPUSet
	if err := unix.SchedGetaffinity(int(vcpu), &old); err != nil {
		t.Fatal(err)
	}
	one.Set(cpu)
	if err := unix.SchedSetaffinity(int(vcpu), &one); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.SchedSetaffinity(int(vcpu), &old) })

	if err := v.SetLoad(ctx, vm.Load{CPUPercent: 60, IOKiBps: 256, NetKbps: 200}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		v.SetLoad(c, vm.Load{})
	})
	time.Sleep(500 * time.Millisecond)

	sample := func() *VMSample {
		t.Helper()
		s, err := tel.Sample()
		if err != nil {
			t.Fatal(err)
		}
		vs, ok := s[slot]
		if !ok {
			t.Fatalf("no sample for slot %d: %v", slot, s)
		}
		if len(vs.Errors) > 0 {
			t.Fatalf("sample errors: %v", vs.Errors)
		}
		return vs
	}
	const window = 2500 * time.Millisecond
	s0 := sample()
	time.Sleep(window)
	s1 := sample()
	quiet := s1.Sub(*s0)

	spikes, err := tel.Spikes()
	if err != nil {
		t.Fatal(err)
	}
	defer spikes.Close()
	stress := exec.Command(stressng, "--cpu", "4", "--taskset", strconv.Itoa(cpu), "-t", "30", "--quiet")
	stress.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := stress.Start(); err != nil {
		t.Fatal(err)
	}
	stopped := false
	stopStress := func() {
		if !stopped {
			stopped = true
			stopGroup(stress)
		}
	}
	t.Cleanup(stopStress)
	time.Sleep(500 * time.Millisecond)
	stressTIDs := []uint32{}
	for _, p := range processTreeOf(stress.Process.Pid) {
		stressTIDs = append(stressTIDs, threadsOfPID(p)...)
	}
	s2 := sample()
	time.Sleep(window)
	s3 := sample()
	stressed := s3.Sub(*s2)
	stopStress()

	perSec := func(s *VMSample, d time.Duration) float64 {
		return float64(s.Sched.RunDelayNs) / 1e6 / d.Seconds()
	}
	q, st := perSec(&quiet, s1.At.Sub(s0.At)), perSec(&stressed, s3.At.Sub(s2.At))
	t.Logf("vCPU %d run-queue delay: alone %.1f ms/s (mean %.0f µs, p99 %.0f µs), with stress-ng on CPU %d %.1f ms/s (mean %.0f µs, p99 %.0f µs)",
		vcpu, q, quiet.Sched.MeanDelayNs()/1e3, quiet.Sched.Quantile(0.99)/1e3, cpu, st, stressed.Sched.MeanDelayNs()/1e3, stressed.Sched.Quantile(0.99)/1e3)
	if st < 200 || st < 2*q {
		t.Errorf("run-queue delay did not rise: %.1f -> %.1f ms/s", q, st)
	}

	rq, err := tel.Read()
	if err != nil {
		t.Fatal(err)
	}
	for _, tid := range stressTIDs {
		if _, ok := rq[tid]; ok {
			t.Errorf("untracked stress-ng thread %d appears in the eBPF counters", tid)
		}
	}
	if len(rq) != 1 {
		t.Errorf("eBPF counters for %d threads, want only the vCPU: %v", len(rq), keys(rq))
	}

	all := s3.Sub(*s0)
	t.Logf("VM over %v: block writes %d (%d KiB, mean %.0f µs), faults user %d kernel %d (minflt %d majflt %d), tap %+v",
		s3.At.Sub(s0.At).Round(time.Millisecond), all.IO.Requests[IOWrite], all.IO.Bytes[IOWrite]>>10,
		float64(all.IO.LatencyNs[IOWrite])/max(1, float64(all.IO.Requests[IOWrite]))/1e3,
		all.Faults.User, all.Faults.Kernel, all.Faults.Minor, all.Faults.Major, all.Net[v.Tap])
	if all.IO.Requests[IOWrite] == 0 || all.IO.Bytes[IOWrite] < 256<<10 {
		t.Errorf("guest disk writes not seen at the host block layer: %+v", all.IO.Requests)
	}
	if s3.Faults.Minor == 0 {
		t.Errorf("no page faults for QEMU: %+v", s3.Faults)
	}
	if all.Net[v.Tap].RxBytes == 0 {
		t.Errorf("no tap bytes: %+v", all.Net)
	}

	spikes.SetDeadline(time.Now().Add(time.Second))
	sp, err := spikes.Read()
	if err != nil {
		t.Fatalf("no spike event (threshold 2ms) after stress: %v", err)
	}
	t.Logf("spike: %+v", sp)
	if sp.TID != vcpu || sp.VMSlot != slot || sp.VCPUSlot != 0 || sp.Delay < 2*time.Millisecond {
		t.Errorf("spike %+v: want tid %d slot %d/0 delay >= 2ms", sp, vcpu, slot)
	}
}

func keys[V any](m map[uint32]V) []uint32 {
	var out []uint32
	for k := range m {
		out = append(out, k)
	}
	return out
}
