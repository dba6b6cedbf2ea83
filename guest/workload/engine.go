package main

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"
)

// Env is what the engine needs to know about the guest. Tests fake it.
type Env interface {
	OnlineCPUs() int
	HasDisk() bool
	HasNIC() bool
	// MemAvailableMiB is what the kernel could still give us.
	MemAvailableMiB() (int, error)
}

// Generator applies one dimension of the load.
type Generator interface {
	Set(v int) error
}

// Engine holds the current set-point, runs schedules and answers commands.
type Engine struct {
	env                 Env
	cpu, mem, disk, net Generator
	logf                func(format string, args ...any)

	mu       sync.Mutex
	cur      Load
	stopSch  context.CancelFunc // cancels the running schedule, if any
	schedGen int                // increments per schedule, to ignore stale steps
	rootCtx  context.Context
}

// NewEngine wires the generators. ctx bounds schedules.
func NewEngine(ctx context.Context, env Env, cpu, mem, disk, net Generator, logf func(string, ...any)) *Engine {
	return &Engine{env: env, cpu: cpu, mem: mem, disk: disk, net: net, logf: logf, rootCtx: ctx}
}

// Handle answers one request line (tag included) with one reply line.
func (e *Engine) Handle(line string) string {
	tag, rest, err := SplitTag(line)
	prefix := ""
	if tag != "" {
		prefix = "@" + tag + " "
	}
	if err != nil {
		return "err " + err.Error()
	}
	cmd, err := ParseCommand(rest)
	if err != nil {
		return prefix + "err " + err.Error()
	}
	reply := e.Do(cmd)
	if cmd.Kind != KindStatus && cmd.Kind != KindHelp {
		e.logf("command %q -> %q", strings.TrimSpace(rest), reply)
	}
	return prefix + reply
}

// Do executes a parsed command and returns the reply line.
func (e *Engine) Do(cmd Command) string {
	switch cmd.Kind {
	case KindStatus:
		l := e.Current()
		// memavail is the guest kernel's MemAvailable (−1 if unreadable):
		// tests read a balloon's effect from the guest's own accounting.
		avail, err := e.env.MemAvailableMiB()
		if err != nil {
			avail = -1
		}
		return fmt.Sprintf("ok %s cpus=%d memavail=%d", l, e.env.OnlineCPUs(), avail)
	case KindHelp:
		return "ok commands: cpu P | mem MiB | io KiBps | net kbps | set k=v,.. | schedule DUR:k=v,.. ... | status"
	case KindSet:
		e.mu.Lock()
		defer e.mu.Unlock()
		next := cmd.Set.Over(e.cur)
		if err := e.applyLocked(next); err != nil {
			return "err " + err.Error()
		}
		e.cancelScheduleLocked()
		if bitsSet(cmd.Set.Has) > 1 {
			return "ok " + e.cur.String()
		}
		return "ok " + cmd.Set.String()
	case KindSchedule:
		return e.startSchedule(cmd.Steps)
	}
	return "err internal: unknown command kind"
}

func bitsSet(f Field) int {
	n := 0
	for ; f != 0; f &= f - 1 {
		n++
	}
	return n
}

// Current returns the set-point in force.
func (e *Engine) Current() Load {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.cur
}

// validate checks a load against the guest before anything changes.
func (e *Engine) validate(l Load) error {
	if l.IO > 0 && !e.env.HasDisk() {
		return fmt.Errorf("io: no virtio disk (/dev/vda)")
	}
	if l.Net > 0 && !e.env.HasNIC() {
		return fmt.Errorf("net: no virtio-net NIC (eth0)")
	}
	if l.Mem > e.cur.Mem {
		avail, err := e.env.MemAvailableMiB()
		if err != nil {
			return fmt.Errorf("mem: %w", err)
		}
		// What we hold now counts as available to us; keep 16 MiB for the
		// kernel and this program so the OOM killer stays away.
		if limit := avail + e.cur.Mem - 16; l.Mem > limit {
			return fmt.Errorf("mem: %d MiB exceeds what the guest can give (%d MiB)", l.Mem, max(limit, 0))
		}
	}
	return nil
}

// applyLocked validates and applies l; e.mu must be held.
func (e *Engine) applyLocked(l Load) error {
	if err := e.validate(l); err != nil {
		return err
	}
	type dim struct {
		name string
		g    Generator
		old  int
		new  int
	}
	for _, d := range []dim{
		{"cpu", e.cpu, e.cur.CPU, l.CPU},
		{"mem", e.mem, e.cur.Mem, l.Mem},
		{"io", e.disk, e.cur.IO, l.IO},
		{"net", e.net, e.cur.Net, l.Net},
	} {
		if d.old == d.new {
			continue
		}
		if err := d.g.Set(d.new); err != nil {
			return fmt.Errorf("%s: %w", d.name, err)
		}
		switch d.name {
		case "cpu":
			e.cur.CPU = d.new
		case "mem":
			e.cur.Mem = d.new
		case "io":
			e.cur.IO = d.new
		case "net":
			e.cur.Net = d.new
		}
	}
	return nil
}

func (e *Engine) cancelScheduleLocked() {
	if e.stopSch != nil {
		e.stopSch()
		e.stopSch = nil
	}
	e.schedGen++
}

// startSchedule validates every step against the guest, then runs them in
// the background, holding the last step's set-point at the end.
func (e *Engine) startSchedule(steps []Step) string {
	e.mu.Lock()
	defer e.mu.Unlock()
	l := e.cur
	peak := l
	var total time.Duration
	for i, s := range steps {
		l = s.Set.Over(l)
		peak = Load{CPU: max(peak.CPU, l.CPU), Mem: max(peak.Mem, l.Mem), IO: max(peak.IO, l.IO), Net: max(peak.Net, l.Net)}
		if err := e.validate(l); err != nil {
			return fmt.Sprintf("err step %d: %v", i+1, err)
		}
		total += s.Dur
	}
	if err := e.validate(peak); err != nil {
		return "err " + err.Error()
	}
	// Apply the first step now so the reply reflects it and errors surface.
	first := steps[0].Set.Over(e.cur)
	if err := e.applyLocked(first); err != nil {
		return "err step 1: " + err.Error()
	}
	e.cancelScheduleLocked()
	ctx, cancel := context.WithCancel(e.rootCtx)
	e.stopSch = cancel
	gen := e.schedGen
	go e.runSchedule(ctx, gen, steps)
	return fmt.Sprintf("ok schedule steps=%d total=%s", len(steps), total)
}

func (e *Engine) runSchedule(ctx context.Context, gen int, steps []Step) {
	t := time.NewTimer(steps[0].Dur)
	defer t.Stop()
	for i := 1; i < len(steps); i++ {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		e.mu.Lock()
		if e.schedGen != gen {
			e.mu.Unlock()
			return
		}
		next := steps[i].Set.Over(e.cur)
		if err := e.applyLocked(next); err != nil {
			e.logf("schedule step %d: %v (holding previous set-point)", i+1, err)
		} else {
			e.logf("schedule step %d/%d: %s", i+1, len(steps), e.cur)
		}
		e.mu.Unlock()
		t.Reset(steps[i].Dur)
	}
	// The last set-point is held: nothing more to do.
}
