package synthesizer

import (
	"testing"
	"time"

	"github.com/ars-dev/ars/predictor"
)

type clock struct{ t time.Time }

func (c *clock) now() time.Time { return c.t }

func TestCPUDecisions(t *testing.T) {
	c := &clock{t: time.Unix(1000, 0)}
	e, err := New(DefaultConfig(), c.now)
	if err != nil {
		t.Fatal(err)
	}
	sla := SLA{CPU: CPUSLA{FloorMillicores: 200, CeilingMillicores: 1500}}
	steps := []struct {
		advance time.Duration
		alloc   float64
		current int64
		want    int64
	}{
		{0, 50, 0, 200},                           // first: floor
		{time.Second, 901, 200, 910},              // grow at once, rounded up to 10m
		{time.Second, 5000, 910, 1500},            // capped
		{time.Second, 100, 1500, 1500},            // dwell (changed 1 s ago)
		{2 * time.Second, 1400, 1500, 1500},       // within 10 % band
		{0, 100, 1500, 200},                       // shrink to floor
		{100 * time.Millisecond, 1000, 200, 1000}, // grow ignores dwell
	}
	for i, s := range steps {
		c.t = c.t.Add(s.advance)
		d := e.CPU("vm", sla, predictor.Forecast{Alloc: s.alloc}, s.current)
		if d.Target != s.want {
			t.Fatalf("step %d: target %d (%s), want %d", i, d.Target, d.Reason, s.want)
		}
		if d.Changed() != (s.want != s.current) {
			t.Fatalf("step %d: Changed() = %v", i, d.Changed())
		}
		if d.Reason == "" {
			t.Fatalf("step %d: empty reason", i)
		}
	}
}

func TestSLAValidate(t *testing.T) {
	bad := []SLA{
		{CPU: CPUSLA{FloorMillicores: 500, CeilingMillicores: 100}},
		{CPU: CPUSLA{FloorMillicores: 0, CeilingMillicores: 100}},
		{CPU: CPUSLA{FloorMillicores: 100, CeilingMillicores: 2_000_000}},
	}
	for _, s := range bad {
		if err := s.Validate(); err == nil {
			t.Errorf("Validate(%+v) accepted", s)
		}
	}
	if err := DefaultSLA().Validate(); err != nil {
		t.Fatal(err)
	}
}
