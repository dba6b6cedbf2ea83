package tc

import (
	"context"
	"sync"
)

// Call is one recorded Fake call.
type Call struct {
	Op      string // "SetEgress", "SetIngress", "Get", "Clear"
	Link    string
	Rate    uint64 // bits/s for Set*, 0 otherwise
	Changed bool   // whether the call would have written to the kernel
	Err     error
}

// Fake is an in-memory Shaper for executor tests. It validates input like
// the real one, keeps per-link rates, and records every call. The zero
// value is ready to use.
type Fake struct {
	mu    sync.Mutex
	rates map[string]Rates
	calls []Call
	// Missing links behave like vanished taps (ErrNoLink on Set and Get).
	Missing map[string]bool
	// Fail, when set, is consulted before each call; a non-nil error is
	// returned as is (after validation) and nothing changes.
	Fail func(op, link string) error
	// Writes counts calls that changed state (would have written).
	Writes int
}

var _ Shaper = (*Fake)(nil)

// Calls returns a copy of the recorded calls.
func (f *Fake) Calls() []Call {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]Call(nil), f.calls...)
}

func (f *Fake) record(c Call) {
	if c.Changed {
		f.Writes++
	}
	f.calls = append(f.calls, c)
}

func (f *Fake) pre(ctx context.Context, op, link string, rate uint64, checkRate bool) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := ValidateLink(link); err != nil {
		return err
	}
	if checkRate {
		if err := ValidateRate(rate); err != nil {
			return err
		}
	}
	if f.Fail != nil {
		if err := f.Fail(op, link); err != nil {
			return err
		}
	}
	if f.Missing[link] && op != "Clear" {
		return ErrNoLink
	}
	return nil
}

func (f *Fake) set(ctx context.Context, op, link string, rate uint64, egress bool) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.pre(ctx, op, link, rate, true); err != nil {
		f.record(Call{Op: op, Link: link, Rate: rate, Err: err})
		return false, err
	}
	rate = rate &^ 7 // the kernel keeps whole bytes per second
	if f.rates == nil {
		f.rates = map[string]Rates{}
	}
	r := f.rates[link]
	cur := &r.IngressBitsPerSec
	if egress {
		cur = &r.EgressBitsPerSec
	}
	changed := *cur != rate
	*cur = rate
	f.rates[link] = r
	f.record(Call{Op: op, Link: link, Rate: rate, Changed: changed})
	return changed, nil
}

// SetEgress implements Shaper.
func (f *Fake) SetEgress(ctx context.Context, link string, rate uint64) (bool, error) {
	return f.set(ctx, "SetEgress", link, rate, true)
}

// SetIngress implements Shaper.
func (f *Fake) SetIngress(ctx context.Context, link string, rate uint64) (bool, error) {
	return f.set(ctx, "SetIngress", link, rate, false)
}

// Get implements Shaper.
func (f *Fake) Get(ctx context.Context, link string) (Rates, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.pre(ctx, "Get", link, 0, false); err != nil {
		f.record(Call{Op: "Get", Link: link, Err: err})
		return Rates{}, err
	}
	f.record(Call{Op: "Get", Link: link})
	return f.rates[link], nil
}

// Clear implements Shaper.
func (f *Fake) Clear(ctx context.Context, link string) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.pre(ctx, "Clear", link, 0, false); err != nil {
		f.record(Call{Op: "Clear", Link: link, Err: err})
		return false, err
	}
	_, had := f.rates[link]
	delete(f.rates, link)
	f.record(Call{Op: "Clear", Link: link, Changed: had})
	return had, nil
}
