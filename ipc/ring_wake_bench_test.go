package ipc

import (
	"fmt"
	"os/exec"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"
)

// BenchmarkIPCWake takes the blocking consumer's wake-up latency apart
// (docs/BENCHMARKS.md, "Blocking wake-up"): the same one-way latency as
// BenchmarkIPC64's block_p99 under variations that each test one
// explanation — the producer's pause (how long the consumer's CPU sits
// idle), SCHED_IDLE spinners that keep every CPU out of its idle state,
// GOMAXPROCS=1 (Go scheduler hand-offs), a 1 ns timer slack on the
// consumer's thread, and a consumer that spins through the pause.
//
//	go test -run '^$' -bench IPCWake -benchtime 1x ./ipc/
func BenchmarkIPCWake(b *testing.B) {
	const n = 2000
	for _, v := range []struct {
		name    string
		pauseUS int
		cfg     RingConfig
		fill    bool // SCHED_IDLE spinners on every CPU
		procs1  bool
		slack   bool
		pinned  bool // producer on CPU 0, consumer process on CPU 1
	}{
		{name: "block/pause=20us", pauseUS: 20, cfg: RingConfig{Spin: 1}},
		{name: "block/pause=200us", pauseUS: 200, cfg: RingConfig{Spin: 1}},
		{name: "block/pause=2ms", pauseUS: 2000, cfg: RingConfig{Spin: 1}},
		{name: "block/pause=200us/gomaxprocs=1", pauseUS: 200, cfg: RingConfig{Spin: 1}, procs1: true},
		{name: "block/pause=200us/timerslack=1ns", pauseUS: 200, cfg: RingConfig{Spin: 1}, slack: true},
		{name: "block/pause=200us/idle-spinners", pauseUS: 200, cfg: RingConfig{Spin: 1}, fill: true},
		{name: "block/pause=200us/pinned", pauseUS: 200, cfg: RingConfig{Spin: 1}, pinned: true},
		{name: "spin/pause=200us", pauseUS: 200, cfg: RingConfig{Spin: -1}},
		{name: "spin/pause=200us/pinned", pauseUS: 200, cfg: RingConfig{Spin: -1}, pinned: true},
	} {
		b.Run(v.name, func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				if v.fill {
					idleSpinners(b)
				}
				if v.procs1 {
					old := runtime.GOMAXPROCS(1)
					b.Cleanup(func() { runtime.GOMAXPROCS(old) })
				}
				if v.slack {
					runtime.LockOSThread()
					old, _ := unix.PrctlRetInt(unix.PR_GET_TIMERSLACK, 0, 0, 0, 0)
					if err := unix.Prctl(unix.PR_SET_TIMERSLACK, 1, 0, 0, 0); err != nil {
						b.Fatal(err)
					}
					b.Cleanup(func() {
						unix.Prctl(unix.PR_SET_TIMERSLACK, uintptr(old), 0, 0, 0)
						runtime.UnlockOSThread()
					})
				}
				helperCPU := -1
				if v.pinned {
					if runtime.NumCPU() < 2 {
						b.Skip("needs 2 CPUs")
					}
					helperCPU = 0
					b.Cleanup(pinProcess(1))
				}
				lat := ringLatencyOn(b, fmt.Sprintf("latb %d %d", n, v.pauseUS), v.cfg, helperCPU)
				b.ReportMetric(pct(lat, 50), "p50_ns")
				b.ReportMetric(pct(lat, 90), "p90_ns")
				b.ReportMetric(pct(lat, 99), "p99_ns")
				b.ReportMetric(pct(lat, 100), "max_ns")
			}
		})
	}
}

// idleSpinners starts one SCHED_IDLE busy loop per CPU (stopped in
// Cleanup): no CPU ever enters its idle state, yet any normal task that
// wakes preempts a spinner at once.
func idleSpinners(b *testing.B) {
	chrt, err := exec.LookPath("chrt")
	if err != nil {
		b.Skip("chrt (util-linux) not installed")
	}
	for i := 0; i < runtime.NumCPU(); i++ {
		cmd := exec.Command(chrt, "--idle", "0", "sh", "-c", "while :; do :; done")
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	}
}
