//go:build linux

package telemetry

import (
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// pattern is what a contending thread does in a loop: spin for Spin, then
// sleep for Sleep (0: never sleeps, so it is only ever preempted).
type pattern struct {
	Name        string
	Spin, Sleep time.Duration
}

// contention is a set of OS threads pinned to one CPU, fighting for it.
type contention struct {
	tids    []uint32 // in the order of the patterns
	start   chan struct{}
	stop    atomic.Bool
	done    sync.WaitGroup
	release chan struct{}
	exited  sync.WaitGroup
}

// startContention starts one locked OS thread per pattern, all pinned to
// cpu, and returns once every thread is parked (blocked, its kernel
// counters settled) waiting for run. The threads exit at test cleanup.
func startContention(t testing.TB, cpu int, patterns []pattern) *contention {
	t.Helper()
	// Every thread spins in Go code, so each needs its own P; otherwise the
	// Go scheduler, not the kernel, would decide who runs.
	old := runtime.GOMAXPROCS(len(patterns) + runtime.NumCPU() + 2)
	c := &contention{start: make(chan struct{}), release: make(chan struct{})}
	type ready struct {
		i   int
		tid uint32
		err error
	}
	readyCh := make(chan ready, len(patterns))
	c.tids = make([]uint32, len(patterns))
	c.done.Add(len(patterns))
	c.exited.Add(len(patterns))
	for i, p := range patterns {
		go func() {
			defer c.exited.Done()
			// Never unlocked: the thread exits with the goroutine, so its
			// pinning does not leak into the runtime's thread pool.
			runtime.LockOSThread()
			var set unix.CPUSet
			set.Set(cpu)
			err := unix.SchedSetaffinity(0, &set)
			readyCh <- ready{i, uint32(unix.Gettid()), err}
			if err != nil {
				c.done.Done()
				return
			}
			<-c.start
			for !c.stop.Load() {
				spin(p.Spin, &c.stop)
				if p.Sleep > 0 {
					ts := unix.NsecToTimespec(p.Sleep.Nanoseconds())
					_ = unix.Nanosleep(&ts, nil)
				}
			}
			c.done.Done()
			<-c.release
		}()
	}
	for range patterns {
		r := <-readyCh
		if r.err != nil {
			t.Fatalf("pin thread to CPU %d: %v", cpu, r.err)
		}
		c.tids[r.i] = r.tid
	}
	t.Cleanup(func() {
		c.stop.Store(true)
		select {
		case <-c.start:
		default:
			close(c.start)
		}
		close(c.release)
		c.exited.Wait()
		runtime.GOMAXPROCS(old)
	})
	settle()
	return c
}

// run lets the threads contend for d, then returns once all are parked.
func (c *contention) run(d time.Duration) {
	close(c.start)
	time.Sleep(d)
	c.stop.Store(true)
	c.done.Wait()
	settle()
}

// settle gives parked threads time to finish blocking, so /proc and the
// maps show their final counters.
func settle() { time.Sleep(20 * time.Millisecond) }

// spin burns CPU for d or until stop is set.
func spin(d time.Duration, stop *atomic.Bool) {
	t0 := time.Now()
	for time.Since(t0) < d && !stop.Load() {
	}
}

// lastAllowedCPU is the highest CPU this process may run on.
func lastAllowedCPU(t testing.TB) int {
	t.Helper()
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &set); err != nil {
		t.Fatalf("sched_getaffinity: %v", err)
	}
	cpu := -1
	for i := 0; i < 1024; i++ {
		if set.IsSet(i) {
			cpu = i
		}
	}
	if cpu < 0 {
		t.Fatal("no allowed CPU")
	}
	return cpu
}
