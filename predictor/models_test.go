package predictor

import (
	"errors"
	"math"
	"math/rand/v2"
	"testing"
	"time"
)

func feed(t *testing.T, m Model, vs ...float64) Forecast {
	t.Helper()
	for _, v := range vs {
		if err := m.Observe(v); err != nil {
			t.Fatal(err)
		}
	}
	f, ok := m.Forecast()
	if !ok {
		t.Fatalf("%s: no forecast after %d samples", m.Name(), len(vs))
	}
	return f
}

func TestAllModelsRejectBadSamplesAndWaitForData(t *testing.T) {
	for _, n := range ModelNames() {
		m, err := NewByName(n, 0.02, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := m.Forecast(); ok {
			t.Errorf("%s: forecast before any sample", n)
		}
		for _, bad := range []float64{-1, math.NaN(), math.Inf(1)} {
			if err := m.Observe(bad); !errors.Is(err, ErrBadSample) {
				t.Errorf("%s: Observe(%v) = %v, want ErrBadSample", n, bad, err)
			}
		}
		f := feed(t, m, 0, 0, 5)
		if f.Samples != 3 || f.Alloc < 0 || math.IsNaN(f.Alloc) || f.P95 > f.P99+1e-9 {
			t.Errorf("%s: forecast %+v", n, f)
		}
	}
	if _, err := NewByName("nope", 0.02, time.Second); err == nil {
		t.Error("unknown model accepted")
	}
}

func TestLastValue(t *testing.T) {
	f := feed(t, NewLastValue(0.1), 3, 7)
	if f.P50 != 7 || math.Abs(f.Alloc-7.7) > 1e-12 {
		t.Fatalf("%+v", f)
	}
}

func TestWindowMaxExactAndBlocked(t *testing.T) {
	m := NewWindowMax("w", 3, 0)
	for i, want := range []float64{5, 5, 5, 4, 4} {
		// samples 5,1,2,4,3: max of the last 3
		v := []float64{5, 1, 2, 4, 3}[i]
		if f := feed(t, m, v); f.Alloc != want {
			t.Fatalf("step %d: max %v, want %v", i, f.Alloc, want)
		}
	}
	// A long window is kept in blocks: exact to within one block.
	w := 1000
	m = NewWindowMax("w", w, 0)
	for i := 0; i < 5000; i++ {
		v := 1.0
		if i == 2000 {
			v = 100
		}
		f := feed(t, m, v)
		age := i - 2000
		inWindow := age >= 0 && age < w-m.block
		outWindow := age >= w || age < 0
		if inWindow && f.Alloc != 100 || outWindow && f.Alloc != 1 {
			t.Fatalf("i=%d age=%d alloc %v", i, age, f.Alloc)
		}
	}
	if len(m.maxes) > windowBlocks {
		t.Fatalf("%d blocks", len(m.maxes))
	}
}

func TestDecayHistPercentileAndDecay(t *testing.T) {
	m := NewDecayHist("h", 0.9, 100, 0)
	for i := 0; i < 1000; i++ {
		_ = m.Observe(float64(i%100 + 1)) // uniform 1..100
	}
	f, _ := m.Forecast()
	if f.Alloc < 88 || f.Alloc > 96 {
		t.Fatalf("p90 of uniform 1..100 = %v", f.Alloc)
	}
	// After 10 half-lives of 1000s the old samples weigh < 0.1 %.
	for i := 0; i < 1000; i++ {
		_ = m.Observe(1000)
	}
	f, _ = m.Forecast()
	if f.P50 < 1000 || f.P50 > 1050 {
		t.Fatalf("p50 after shift = %v", f.P50)
	}
	// Margin multiplies; weights survive the renormalisation.
	v := NewDecayHist("v", 0.9, 1, 0.15)
	for i := 0; i < 5000; i++ {
		_ = v.Observe(10)
	}
	f, _ = v.Forecast()
	if f.Alloc < 11.5 || f.Alloc > 12.1 || math.IsNaN(v.total) || math.IsInf(v.total, 0) {
		t.Fatalf("vpa-style alloc %v total %v", f.Alloc, v.total)
	}
}

func TestDetectPeriod(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	x := make([]float64, 1000)
	for i := range x {
		x[i] = 10 + 5*math.Sin(2*math.Pi*float64(i)/48) + r.NormFloat64()
	}
	if p := DetectPeriod(x, 4, 300, 0.3); p < 47 || p > 49 {
		t.Fatalf("period %d, want 48", p)
	}
	for i := range x {
		x[i] = r.NormFloat64()
	}
	if p := DetectPeriod(x, 4, 300, 0.3); p != 0 {
		t.Fatalf("noise: period %d, want 0", p)
	}
	if p := DetectPeriod(make([]float64, 100), 4, 30, 0.3); p != 0 {
		t.Fatalf("constant: period %d", p)
	}
}

func TestHoltWintersLearnsSeason(t *testing.T) {
	m := NewCalibrated("holtwinters", 0.02)
	var errHW, errLast float64
	prev := 0.0
	for i := 0; i < 3000; i++ {
		y := 100 + 80*math.Max(0, math.Sin(2*math.Pi*float64(i)/60))
		if i > 2000 {
			f, _ := m.Forecast()
			errHW += math.Abs(f.P50 - y)
			errLast += math.Abs(prev - y)
		}
		_ = m.Observe(y)
		prev = y
	}
	if m.hw.period != 60 {
		t.Fatalf("period %d, want 60", m.hw.period)
	}
	if errHW > errLast/3 {
		t.Fatalf("holt-winters error %v not well below last-value %v", errHW, errLast)
	}
}

func TestQuantRegLearnsUpperQuantile(t *testing.T) {
	// y = 100 + noise uniform in [0, 50): the 0.9 quantile is 145.
	r := rand.New(rand.NewPCG(3, 4))
	q := newQuantReg(0.9)
	for i := 0; i < 20000; i++ {
		y := 100 + 50*r.Float64()
		q.learn(y)
		q.features(y, y, y, y, y, y)
	}
	cover := 0
	for i := 0; i < 2000; i++ {
		y := 100 + 50*r.Float64()
		if y <= q.pred {
			cover++
		}
		q.learn(y)
		q.features(y, y, y, y, y, y)
	}
	if c := float64(cover) / 2000; c < 0.85 || c > 0.95 {
		t.Fatalf("coverage %v, want ≈ 0.9", c)
	}
}

// violationRate replays ys through m and returns the share of steps after
// `from` where y exceeded the allocation made before it.
func violationRate(m Model, ys []float64, from int) float64 {
	v, n := 0, 0
	for i, y := range ys {
		if i > 0 && i >= from {
			f, _ := m.Forecast()
			n++
			if y > f.Alloc {
				v++
			}
		}
		_ = m.Observe(y)
	}
	return float64(v) / float64(n)
}

func TestCalibrationHitsTargetOnNoise(t *testing.T) {
	for _, target := range []float64{0.01, 0.02, 0.05} {
		for _, name := range []string{"ars", "last-aci", "ewma-aci", "holtwinters-aci", "quantreg-aci", "loglast-aci", "logar-aci"} {
			r := rand.New(rand.NewPCG(5, 6))
			ys := make([]float64, 20000)
			for i := range ys {
				ys[i] = 50 + 10*r.ExpFloat64() // skewed noise
			}
			m, _ := NewByName(name, target, time.Second)
			got := violationRate(m, ys, 0)
			if got < target*0.7 || got > target*1.3 {
				t.Errorf("%s target %v: violation %v", name, target, got)
			}
		}
	}
}

func TestCalibrationFollowsLevelShift(t *testing.T) {
	// A quiet series jumps to 10× the level with 10× the noise halfway:
	// calibration must keep the rate after the shift, not just on average,
	// and the allocation must follow the new level.
	r := rand.New(rand.NewPCG(7, 8))
	ys := make([]float64, 10000)
	for i := range ys {
		if i < 5000 {
			ys[i] = 100 + 5*r.NormFloat64()
		} else {
			ys[i] = 1000 + 50*r.NormFloat64()
		}
	}
	m := NewARS(0.02)
	after := violationRate(m, ys, 5000)
	if after < 0.01 || after > 0.03 {
		t.Fatalf("violation after the shift %v, want ≈ 0.02", after)
	}
	f, _ := m.Forecast()
	if f.Alloc < 1000 || f.Alloc > 1300 || f.P50 < 900 || f.P50 > 1100 {
		t.Fatalf("forecast after shift %+v", f)
	}
	if !(f.P50 <= f.P95 && f.P95 <= f.P99) {
		t.Fatalf("quantiles out of order %+v", f)
	}
}

func TestCalibrationFollowsVolatilityShift(t *testing.T) {
	// Same level, noise grows 8× for a while: violations must not pile up.
	r := rand.New(rand.NewPCG(9, 10))
	ys := make([]float64, 12000)
	for i := range ys {
		s := 5.0
		if i >= 4000 && i < 8000 {
			s = 40
		}
		ys[i] = math.Max(0, 500+s*r.NormFloat64())
	}
	m := NewARS(0.02)
	if v := violationRate(m, ys[:8000], 4000); v > 0.035 {
		t.Fatalf("violation during the noisy phase %v", v)
	}
}

func TestStateSize(t *testing.T) {
	// The biggest state per VM-resource, measured by the struct sizes.
	for _, h := range []int{1, DefaultHorizon, MaxHorizon} {
		m := NewARSHorizon(0.02, h)
		for i := 0; i < 2000; i++ { // past a season detection (scratch allocated)
			_ = m.Observe(float64(i % 17))
		}
		size := int(unsafeSizeofARS(m))
		if size > 64<<10 {
			t.Fatalf("ARS state with horizon %d: %d B > 64 KiB", h, size)
		}
		t.Logf("ARS state, horizon %d ≈ %d B", h, size)
	}
}

func TestTracker(t *testing.T) {
	var tr Tracker
	tr.Record(Forecast{P50: 10, Alloc: 12}, 11)
	tr.Record(Forecast{P50: 10, Alloc: 12}, 14)
	tr.Record(Forecast{P50: 10, Alloc: 12}, math.NaN())
	if tr.Steps != 2 || tr.Violations != 1 || tr.MAE() != 2.5 || tr.ViolationRate() != 0.5 || tr.Slack != 1 || tr.RecentViolation != 0.5 {
		t.Fatalf("%+v", tr)
	}
}

func TestConfigNew(t *testing.T) {
	c := DefaultConfig()
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	m, err := New(c, time.Second)
	if err != nil || m.Name() != "ars" {
		t.Fatalf("%v %v", m, err)
	}
	c.Model = "ewma"
	if m, err := New(c, time.Second); err != nil || m.Name() != "ewma" {
		t.Fatalf("%v %v", m, err)
	}
	for _, bad := range []Config{{Model: "ars", TargetViolation: 0, Alpha: 0.5}, {Model: "x", TargetViolation: 0.02, Alpha: 0.5}, {Model: "ars", TargetViolation: 0.02, Alpha: 2}} {
		if err := bad.Validate(); err == nil {
			t.Errorf("%+v accepted", bad)
		}
	}
}
