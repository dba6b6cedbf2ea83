package tc

import (
	"context"
	"errors"
	"strings"
	"testing"
)

func TestValidateRate(t *testing.T) {
	for _, tc := range []struct {
		rate uint64
		ok   bool
	}{
		{0, false}, {1, false}, {MinRate - 1, false}, {MinRate, true},
		{20_000_000, true}, {MaxRate, true}, {MaxRate + 1, false}, {^uint64(0), false},
	} {
		err := ValidateRate(tc.rate)
		if (err == nil) != tc.ok {
			t.Errorf("ValidateRate(%d) = %v, want ok=%v", tc.rate, err, tc.ok)
		}
		if err != nil && !errors.Is(err, ErrInvalidRate) {
			t.Errorf("ValidateRate(%d) = %v, not ErrInvalidRate", tc.rate, err)
		}
	}
}

func TestValidateLink(t *testing.T) {
	for _, tc := range []struct {
		name string
		ok   bool
	}{
		{"vnet0", true}, {"tap-abc", true}, {"123456789012345", true},
		{"", false}, {"1234567890123456", false}, {".", false}, {"..", false},
		{"a/b", false}, {"a b", false}, {"a:1", false}, {"a\x00", false},
		{IFBName("vnet0"), false},
	} {
		err := ValidateLink(tc.name)
		if (err == nil) != tc.ok {
			t.Errorf("ValidateLink(%q) = %v, want ok=%v", tc.name, err, tc.ok)
		}
		if err != nil && !errors.Is(err, ErrInvalidLink) {
			t.Errorf("ValidateLink(%q) = %v, not ErrInvalidLink", tc.name, err)
		}
	}
}

func TestBurst(t *testing.T) {
	for _, tc := range []struct {
		rate uint64
		want uint32
	}{
		{MinRate, MinBurst},
		{20_000_000, MinBurst}, // 10 ms = 25 000 B < 32 KiB
		{100_000_000, 125_000},
		{10_000_000_000, 12_500_000},
		{MaxRate, 125_000_000},
	} {
		if got := Burst(tc.rate); got != tc.want {
			t.Errorf("Burst(%d) = %d, want %d", tc.rate, got, tc.want)
		}
	}
}

func TestIFBName(t *testing.T) {
	a, b := IFBName("vnet0"), IFBName("vnet1")
	if a == b || !strings.HasPrefix(a, IFBPrefix) || len(a) > 15 || IFBName("vnet0") != a {
		t.Fatalf("IFBName: %q %q", a, b)
	}
	if len(IFBName("123456789012345")) != 14 {
		t.Fatalf("IFBName length %d", len(IFBName("123456789012345")))
	}
}

func TestFake(t *testing.T) {
	ctx := context.Background()
	var f Fake
	var _ Shaper = &f

	if ch, err := f.SetEgress(ctx, "vnet0", 20_000_000); err != nil || !ch {
		t.Fatalf("first SetEgress = %v, %v", ch, err)
	}
	if ch, err := f.SetEgress(ctx, "vnet0", 20_000_000); err != nil || ch {
		t.Fatalf("same SetEgress = %v, %v; want no write", ch, err)
	}
	if ch, err := f.SetIngress(ctx, "vnet0", 5_000_003); err != nil || !ch {
		t.Fatalf("SetIngress = %v, %v", ch, err)
	}
	if _, err := f.SetEgress(ctx, "vnet0", 0); !errors.Is(err, ErrInvalidRate) {
		t.Fatalf("rate 0: %v", err)
	}
	if _, err := f.SetIngress(ctx, "bad/name", 1_000_000); !errors.Is(err, ErrInvalidLink) {
		t.Fatalf("bad link: %v", err)
	}
	r, err := f.Get(ctx, "vnet0")
	if err != nil || r != (Rates{EgressBitsPerSec: 20_000_000, IngressBitsPerSec: 5_000_000}) {
		t.Fatalf("Get = %+v, %v", r, err)
	}
	f.Missing = map[string]bool{"gone": true}
	if _, err := f.SetEgress(ctx, "gone", 1_000_000); !errors.Is(err, ErrNoLink) {
		t.Fatalf("missing: %v", err)
	}
	boom := errors.New("boom")
	f.Fail = func(op, link string) error {
		if op == "SetIngress" {
			return boom
		}
		return nil
	}
	if _, err := f.SetIngress(ctx, "vnet0", 1_000_000); !errors.Is(err, boom) {
		t.Fatalf("Fail hook: %v", err)
	}
	f.Fail = nil
	if ch, err := f.Clear(ctx, "vnet0"); err != nil || !ch {
		t.Fatalf("Clear = %v, %v", ch, err)
	}
	if ch, err := f.Clear(ctx, "vnet0"); err != nil || ch {
		t.Fatalf("second Clear = %v, %v", ch, err)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := f.SetEgress(cctx, "vnet0", 1_000_000); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled: %v", err)
	}

	calls := f.Calls()
	var ops []string
	for _, c := range calls {
		s := c.Op
		if c.Changed {
			s += "*"
		}
		if c.Err != nil {
			s += "!"
		}
		ops = append(ops, s)
	}
	want := "SetEgress* SetEgress SetIngress* SetEgress! SetIngress! Get SetEgress! SetIngress! Clear* Clear SetEgress!"
	if got := strings.Join(ops, " "); got != want {
		t.Fatalf("calls:\n got %s\nwant %s", got, want)
	}
	if f.Writes != 3 {
		t.Fatalf("Writes = %d, want 3", f.Writes)
	}
}
