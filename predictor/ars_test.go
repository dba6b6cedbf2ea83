package predictor

import (
	"math"
	"math/rand/v2"
	"testing"
	"time"
)

// burstySeries is an idle VM (≈100) with bursts of 8–15 steps towards a
// capacity of 20,000 every ≈200 steps: the shape of the regime-switching
// Bitbrains VMs. idle[i] says whether step i is at least 30 steps past the
// end of the last burst.
func burstySeries(n int, seed uint64) (ys []float64, idle []bool) {
	r := rand.New(rand.NewPCG(seed, seed+1))
	ys = make([]float64, n)
	idle = make([]bool, n)
	since := 1000
	for i := 0; i < n; {
		if r.Float64() < 1.0/200 {
			l := 8 + r.IntN(8)
			for k := 0; k < l && i < n; k++ {
				ys[i] = 2000 + 18000*r.Float64()
				i++
			}
			since = 0
			continue
		}
		ys[i] = 100 + 5*r.NormFloat64()
		since++
		idle[i] = since >= 30
		i++
	}
	return ys, idle
}

func TestARSAfterBurstsMarginShrinksAndCapHolds(t *testing.T) {
	ys, idle := burstySeries(20000, 11)
	m := NewARS(0.02)
	var v, n, idleSum, idleN float64
	top := 0.0
	for i, y := range ys {
		if i > 0 {
			f, _ := m.Forecast()
			n++
			if y > f.Alloc {
				v++
			}
			if idle[i] && i > 2000 {
				idleSum += f.Alloc
				idleN++
			}
			// Past the warm-up, never above the largest recent sample.
			if float64(i)*0.02 >= envWarm && f.Alloc > top+1e-9 {
				t.Fatalf("step %d: allocation %v above the envelope %v", i, f.Alloc, top)
			}
		}
		_ = m.Observe(y)
		top = math.Max(top, y) // bursts recur well within histLen
	}
	if rate := v / n; rate < 0.01 || rate > 0.03 {
		t.Errorf("violation %.4f, want ≈ 0.02", rate)
	}
	// 30+ steps after a burst the margin must be back near the idle level's
	// spread (a raw-scale margin keeps thousands of MHz here).
	t.Logf("idle mean %.1f", idleSum/idleN)
	if mean := idleSum / idleN; mean > 200 {
		t.Errorf("mean allocation while idle %.0f, want < 200 (idle level 100; ≈ 390 with raw-scale members only)", mean)
	}
}

func TestARSFollowsLevelShiftDownAndAllHorizons(t *testing.T) {
	// A busy series drops to a tenth of its level: the allocation must
	// come down (not stay at the old envelope for histLen steps), and every
	// horizon must keep its rate after the shift.
	r := rand.New(rand.NewPCG(21, 22))
	ys := make([]float64, 8000)
	for i := range ys {
		if i < 4000 {
			ys[i] = 1000 + 50*r.NormFloat64()
		} else {
			ys[i] = 100 + 5*r.NormFloat64()
		}
	}
	const H = 4
	m := NewARSHorizon(0.02, H)
	var viol, steps [H]float64
	var fs []Forecast
	for i, y := range ys {
		_ = m.Observe(y)
		f, _ := m.Forecast()
		if f.Horizon != H {
			t.Fatalf("horizon %d, want %d", f.Horizon, H)
		}
		fs = append(fs, f)
		for h := 1; h <= H && i-h >= 0; h++ {
			if i-h >= 4500 { // forecast made after the shift settled
				steps[h-1]++
				if y > fs[i-h].Ahead[h-1].Alloc {
					viol[h-1]++
				}
			}
		}
	}
	for h := 0; h < H; h++ {
		if rate := viol[h] / steps[h]; rate < 0.01 || rate > 0.035 {
			t.Errorf("h=%d: violation after the shift %.4f, want ≈ 0.02", h+1, rate)
		}
	}
	f := fs[len(fs)-1]
	if f.Alloc > 150 || f.P50 < 85 || f.P50 > 115 {
		t.Fatalf("after the drop: %+v", f)
	}
	for h := 0; h < H; h++ {
		q := f.Ahead[h]
		if !(q.P50 <= q.P95 && q.P95 <= q.P99) || q.Alloc < q.P50 || q.Alloc > 200 {
			t.Errorf("h=%d: quantiles %+v", h+1, q)
		}
	}
	if f.Ahead[0].Alloc != f.Alloc || f.Ahead[0].P50 != f.P50 {
		t.Errorf("Ahead[0] %+v differs from the step-1 fields %+v", f.Ahead[0], f)
	}
}

func TestPersistenceLearner(t *testing.T) {
	// φ → small on noise around a mean, → near 1 on a random walk.
	r := rand.New(rand.NewPCG(31, 32))
	noise, walk := NewARS(0.02), NewARS(0.02)
	x := 1000.0
	for i := 0; i < 5000; i++ {
		_ = noise.Observe(500 + 100*r.NormFloat64())
		x = math.Max(10, x+30*r.NormFloat64())
		_ = walk.Observe(x)
	}
	if noise.phi > 0.4 {
		t.Errorf("φ on white noise %.2f, want small", noise.phi)
	}
	if walk.phi < 0.8 {
		t.Errorf("φ on a random walk %.2f, want near 1", walk.phi)
	}
}

func TestARSIdleThenWake(t *testing.T) {
	// All zeros (the log unit is then tiny), then a jump: allocations stay
	// finite, never above twice the largest sample seen, and calibration
	// still holds on the awake part.
	r := rand.New(rand.NewPCG(41, 42))
	ys := make([]float64, 6000)
	for i := 1000; i < len(ys); i++ {
		ys[i] = 400 + 40*r.NormFloat64()
	}
	m := NewARS(0.02)
	top := 0.0
	for i, y := range ys {
		f, ok := m.Forecast()
		if ok && (math.IsNaN(f.Alloc) || math.IsInf(f.Alloc, 0) || f.Alloc > 2*top+1e-9) {
			t.Fatalf("step %d: allocation %v (largest sample %v)", i, f.Alloc, top)
		}
		_ = m.Observe(y)
		top = math.Max(top, y)
	}
	m2 := NewARS(0.02)
	if v := violationRate(m2, ys, 2000); v < 0.01 || v > 0.03 {
		t.Errorf("violation after waking %.4f", v)
	}
}

func TestHorizonConfigAndBacktest(t *testing.T) {
	c := DefaultConfig()
	c.Horizon = 3
	mod, err := New(c, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	f := feed(t, mod, 1, 2, 3, 4)
	if f.Horizon != 3 {
		t.Fatalf("horizon %d", f.Horizon)
	}
	c.Horizon = MaxHorizon + 1
	if c.Validate() == nil {
		t.Error("horizon above MaxHorizon accepted")
	}
	// Protocol: the allocation for h steps ahead decided after sample j is
	// scored against sample j+h. On a constant series nothing is violated
	// after warm-up and each horizon has len−h steps.
	s := []Series{{VM: "c", V: make([]float64, 300), T: make([]int64, 300)}}
	for i := range s[0].V {
		s[0].V[i], s[0].T[i] = 7, int64(300*i)
	}
	hs, err := BacktestHorizon(s, 0.02, 3)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range hs {
		if h.Steps != 300-h.H || h.Violations != 0 {
			t.Errorf("%+v", h)
		}
	}
	if _, err := BacktestHorizon(s, 0.02, 0); err == nil {
		t.Error("horizon 0 accepted")
	}
}

// BenchmarkARSHorizon is the cost of one Observe + Forecast of "ars" by
// horizon (the speed goal: ≤ 5 µs per VM-resource).
func BenchmarkARSHorizon(b *testing.B) {
	for _, h := range []int{1, DefaultHorizon, MaxHorizon} {
		b.Run("h="+string(rune('0'+h)), func(b *testing.B) {
			m := NewARSHorizon(0.02, h)
			xs, _ := burstySeries(4096, 3)
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				_ = m.Observe(xs[i&4095])
				f, _ := m.Forecast()
				_ = f
			}
		})
	}
}
