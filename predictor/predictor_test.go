package predictor

import (
	"errors"
	"math"
	"testing"
)

func TestEWMA(t *testing.T) {
	m, err := NewEWMA(EWMAConfig{Alpha: 0.5, Margin: 0.2})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := m.Forecast(); ok {
		t.Fatal("forecast before any sample")
	}
	for _, v := range []float64{100, 200, 200} {
		if err := m.Observe(v); err != nil {
			t.Fatal(err)
		}
	}
	f, ok := m.Forecast()
	// 100 → 150 → 175
	if !ok || f.P50 != 175 || math.Abs(f.Alloc-210) > 1e-9 || f.Samples != 3 {
		t.Fatalf("forecast = %+v, want P50 175 Alloc 210 Samples 3", f)
	}
	for _, bad := range []float64{-1, math.NaN(), math.Inf(1)} {
		if err := m.Observe(bad); !errors.Is(err, ErrBadSample) {
			t.Errorf("Observe(%v) = %v, want ErrBadSample", bad, err)
		}
	}
	if f2, _ := m.Forecast(); f2 != f {
		t.Errorf("bad samples changed the forecast: %+v", f2)
	}
}

func TestEWMAConfigValidate(t *testing.T) {
	for _, c := range []EWMAConfig{{Alpha: 0}, {Alpha: 1.5}, {Alpha: 0.5, Margin: -1}, {Alpha: math.NaN()}} {
		if _, err := NewEWMA(c); err == nil {
			t.Errorf("NewEWMA(%+v) accepted", c)
		}
	}
}

func TestCPUDemand(t *testing.T) {
	cases := []struct {
		name string
		o    CPUObservation
		want float64
	}{
		{"unthrottled", CPUObservation{UsageMillicores: 300, LimitMillicores: 500, Periods: 10}, 300},
		{"fully throttled", CPUObservation{UsageMillicores: 500, LimitMillicores: 500, Periods: 10, ThrottledPeriods: 10}, 1000},
		{"half throttled", CPUObservation{UsageMillicores: 500, LimitMillicores: 500, Periods: 10, ThrottledPeriods: 5}, 750},
		{"no limit", CPUObservation{UsageMillicores: 500, Periods: 10, ThrottledPeriods: 10}, 500},
		{"negative usage clamps", CPUObservation{UsageMillicores: -5}, 0},
		{"counter glitch >1", CPUObservation{UsageMillicores: 100, LimitMillicores: 100, Periods: 1, ThrottledPeriods: 3}, 200},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := CPUDemand(c.o); got != c.want {
				t.Fatalf("CPUDemand = %v, want %v", got, c.want)
			}
		})
	}
}

func TestCPUDemandRunqWait(t *testing.T) {
	// 300m used, vCPUs waited 200 ms per second: demand 500m.
	if d := CPUDemand(CPUObservation{UsageMillicores: 300, RunqWaitMillicores: 200}); d != 500 {
		t.Fatalf("%v", d)
	}
	// Throttled in every period and waited: the larger estimate wins.
	if d := CPUDemand(CPUObservation{UsageMillicores: 500, LimitMillicores: 500, Periods: 10, ThrottledPeriods: 10, RunqWaitMillicores: 100}); d != 1000 {
		t.Fatalf("%v", d)
	}
	if d := CPUDemand(CPUObservation{UsageMillicores: 300, RunqWaitMillicores: math.Inf(1)}); d != 300 {
		t.Fatalf("inf wait: %v", d)
	}
}

func TestMemDemand(t *testing.T) {
	cases := []struct {
		o    MemObservation
		want float64
	}{
		{MemObservation{UsageBytes: 1000}, 1000},
		{MemObservation{UsageBytes: 1000, ReclaimableBytes: 300}, 700},
		{MemObservation{UsageBytes: 1000, PSISome: 0.5}, 1500},
		{MemObservation{UsageBytes: 1000, MajorFaultsPerSec: 1, FaultBytes: 10}, 1600},
		{MemObservation{UsageBytes: 1000, PSISome: 3}, 2000},
		{MemObservation{UsageBytes: -1}, 0},
	}
	for _, c := range cases {
		if got := MemDemand(c.o); got != c.want {
			t.Errorf("MemDemand(%+v) = %v, want %v", c.o, got, c.want)
		}
	}
}

func TestIODemand(t *testing.T) {
	if d := IODemand(IOObservation{Throughput: 100, Limit: 100, QueueLatencySec: 0.003, ServiceSec: 0.001}); math.Abs(d-400) > 1e-9 {
		t.Fatalf("%v", d)
	}
	if d := IODemand(IOObservation{Throughput: 100, QueueLatencySec: 0.003, ServiceSec: 0.001}); d != 100 {
		t.Fatalf("unthrottled: %v", d)
	}
}
