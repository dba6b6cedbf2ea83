package cgroup

import (
	"context"
	"fmt"
	"sync"
)

// Call is one recorded Fake call.
type Call struct {
	Op     string // "SetCPU", "SetCPUWeight", "SetCpuset", "SetMemory", "SetBlockIO", "Read"
	Target string // Target.Name
	Args   string // the arguments, formatted
	Err    error
}

// Fake is an in-memory Writer for executor tests: it validates like Real
// (without the kernel-derived checks unless Usage/ParentCpus are set),
// keeps per-target State and records every call. The zero value is ready.
type Fake struct {
	mu     sync.Mutex
	states map[string]State
	calls  []Call
	// Usage, if set for a target, is its memory usage for the margin check.
	Usage map[string]int64
	// ParentCpus, if set, is the parent's effective cpus for every target.
	ParentCpus string
	// Vanished targets return ErrVanished.
	Vanished map[string]bool
	// Fail, if set, is consulted after validation; a non-nil error is
	// returned and nothing changes.
	Fail func(op, target string) error
}

var _ Writer = (*Fake)(nil)

// Calls returns a copy of the recorded calls.
func (f *Fake) Calls() []Call {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]Call(nil), f.calls...)
}

func (f *Fake) do(ctx context.Context, op string, t Target, args string, validate func() error, apply func(*State)) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	err := ctx.Err()
	if err == nil && validate != nil {
		err = validate()
	}
	if err == nil && f.Vanished[t.Name] {
		err = fmt.Errorf("%w: %s", ErrVanished, t.Name)
	}
	if err == nil && f.Fail != nil {
		err = f.Fail(op, t.Name)
	}
	if err == nil && apply != nil {
		if f.states == nil {
			f.states = map[string]State{}
		}
		s, ok := f.states[t.Name]
		if !ok {
			s = State{QuotaUs: -1, PeriodUs: 100000, Weight: 100, MemMax: -1, MemSoft: -1}
		}
		apply(&s)
		f.states[t.Name] = s
	}
	f.calls = append(f.calls, Call{Op: op, Target: t.Name, Args: args, Err: err})
	return err
}

func (f *Fake) SetCPU(ctx context.Context, t Target, quotaUs int64, periodUs uint64) error {
	return f.do(ctx, "SetCPU", t, fmt.Sprintf("%d %d", quotaUs, periodUs),
		func() error { return ValidateCPU(quotaUs, periodUs) },
		func(s *State) { s.QuotaUs, s.PeriodUs = quotaUs, periodUs })
}

func (f *Fake) SetCPUWeight(ctx context.Context, t Target, weight uint64) error {
	return f.do(ctx, "SetCPUWeight", t, fmt.Sprint(weight),
		func() error { return ValidateWeight(weight) },
		func(s *State) { s.Weight, s.Shares = weight, WeightToShares(weight) })
}

func (f *Fake) SetCpuset(ctx context.Context, t Target, cpus, mems string) error {
	return f.do(ctx, "SetCpuset", t, cpus+" "+mems,
		func() error {
			if _, err := ParseList(mems); err != nil {
				return err
			}
			parent := f.ParentCpus
			if parent == "" {
				parent = cpus
			}
			return validateSubset("cpus", cpus, parent)
		},
		func(s *State) {
			s.Cpus = cpus
			if mems != "" {
				s.Mems = mems
			}
		})
}

func (f *Fake) SetMemory(ctx context.Context, t Target, m Memory) error {
	return f.do(ctx, "SetMemory", t, fmt.Sprintf("max=%d soft=%d", m.Max, m.Soft),
		func() error {
			if err := ValidateMemory(m); err != nil {
				return err
			}
			if u, ok := f.Usage[t.Name]; ok {
				return checkAboveUsage("memory max", m.Max, u)
			}
			return nil
		},
		func(s *State) { s.MemMax, s.MemSoft = m.Max, m.Soft })
}

func (f *Fake) SetBlockIO(ctx context.Context, t Target, dev string, l IOLimit) error {
	return f.do(ctx, "SetBlockIO", t, fmt.Sprintf("%s %+v", dev, l),
		func() error { _, _, err := ParseDevice(dev); return err },
		func(s *State) {
			m := map[string]IOLimit{}
			for k, v := range s.IO {
				m[k] = v
			}
			m[dev] = l
			s.IO = m
		})
}

func (f *Fake) Read(ctx context.Context, t Target) (State, error) {
	var out State
	err := f.do(ctx, "Read", t, "", nil, func(s *State) { out = *s })
	if u, ok := f.Usage[t.Name]; ok {
		out.MemUsage = u
	}
	return out, err
}
