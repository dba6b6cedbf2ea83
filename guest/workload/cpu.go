package main

import (
	"context"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
)

// sliceLen is the duty-cycle period: each worker is busy for duty×slice and
// sleeps the rest, so load is smooth at the host's cgroup sampling rates.
const sliceLen = 10 * time.Millisecond

// cpuLoad burns a total of percent/100 CPUs, spread evenly over one worker
// per online CPU. The worker set follows CPU hotplug.
type cpuLoad struct {
	env     Env
	percent atomic.Int64
	workers atomic.Int64 // how many workers share the load
	wake    chan struct{}

	mu      sync.Mutex
	stop    []context.CancelFunc
	changed chan struct{} // closed and replaced on every Set, to wake idle workers
}

func newCPULoad(env Env) *cpuLoad {
	return &cpuLoad{env: env, wake: make(chan struct{}, 1), changed: make(chan struct{})}
}

// Set changes the total load; busy workers pick it up within one slice,
// idle ones at once.
func (c *cpuLoad) Set(percent int) error {
	c.percent.Store(int64(percent))
	c.mu.Lock()
	close(c.changed)
	c.changed = make(chan struct{})
	c.mu.Unlock()
	select {
	case c.wake <- struct{}{}:
	default:
	}
	return nil
}

func (c *cpuLoad) changedCh() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.changed
}

// Run keeps one worker per online CPU until ctx ends.
func (c *cpuLoad) Run(ctx context.Context) {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		c.resize(ctx, c.env.OnlineCPUs())
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		case <-c.wake:
		}
	}
}

func (c *cpuLoad) resize(ctx context.Context, n int) {
	if n < 1 {
		n = 1
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.stop) == n {
		return
	}
	// Let the Go scheduler use every online CPU, including hot-added ones.
	runtime.GOMAXPROCS(n + 1)
	for len(c.stop) < n {
		wctx, cancel := context.WithCancel(ctx)
		c.stop = append(c.stop, cancel)
		go c.worker(wctx)
	}
	for len(c.stop) > n {
		c.stop[len(c.stop)-1]()
		c.stop = c.stop[:len(c.stop)-1]
	}
	c.workers.Store(int64(n))
}

func (c *cpuLoad) worker(ctx context.Context) {
	for ctx.Err() == nil {
		changed := c.changedCh()
		n := c.workers.Load()
		if n < 1 {
			n = 1
		}
		duty := c.percent.Load() / n // percent of this worker's CPU
		if duty <= 0 {
			// Idle costs nothing: no polling while the set-point is zero.
			select {
			case <-ctx.Done():
				return
			case <-changed:
			}
			continue
		}
		if duty > 100 {
			duty = 100
		}
		start := time.Now()
		busyUntil := start.Add(time.Duration(duty) * sliceLen / 100)
		spin(busyUntil)
		if duty < 100 {
			time.Sleep(time.Until(start.Add(sliceLen)))
		}
	}
}

var spinSink atomic.Uint64

// spin burns CPU until deadline, reading the clock only every few thousand
// iterations (a clock read can be an emulated device access under TCG).
func spin(deadline time.Time) {
	x := uint64(88172645463325252)
	for time.Now().Before(deadline) {
		for i := 0; i < 4000; i++ {
			x ^= x << 13
			x ^= x >> 7
			x ^= x << 17
		}
	}
	spinSink.Add(x)
}
