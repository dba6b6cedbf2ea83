package predictor

import (
	"math"
	"testing"
)

// Two series whose scored samples (after the first) are A = 1,1,1,1,10 and
// B = 5,5,5,5,6; total usage 40. For A the constant 1 violates once and
// leaves no slack, 10 leaves 36; for B the constant 5 violates once and
// leaves none, 6 leaves 4.
func oracleFixture() *BacktestResult {
	a := Series{VM: "a", T: []int64{0, 1, 2, 3, 4, 5}, V: []float64{0, 1, 1, 1, 1, 10}}
	b := Series{VM: "b", T: []int64{0, 1, 2, 3, 4, 5}, V: []float64{0, 5, 5, 5, 5, 6}}
	return &BacktestResult{
		Models: []ModelResult{{Name: "m"}},
		Runs: []SeriesRun{
			// The model violates A once (the 10) and B never.
			{Series: &a, Alloc: [][]float64{{2, 2, 2, 2, 2}}},
			{Series: &b, Alloc: [][]float64{{7, 7, 7, 7, 7}}},
		},
	}
}

func near(a, b float64) bool { return math.Abs(a-b) < 1e-12 }

func TestOracleSameViolations(t *testing.T) {
	o := oracleFixture().OracleSameViolations(0)
	// A: one violation allowed → constant 1, slack 0; B: none → 6, slack 4.
	if !near(o.Slack, 4.0/40) || !near(o.ViolationRate, 1.0/10) {
		t.Fatalf("got slack %v violation %v, want 0.1 and 0.1", o.Slack, o.ViolationRate)
	}
	if len(o.PerSeries) != 2 || !near(o.PerSeries[0], 0.2) || o.PerSeries[1] != 0 {
		t.Fatalf("per series %v", o.PerSeries)
	}
}

func TestOracleFleetSpendsViolationsWhereTheySaveMost(t *testing.T) {
	res := oracleFixture()
	cases := []struct {
		rate, cap   float64
		slack, viol float64
	}{
		{0, 0, 40.0 / 40, 0},     // no violations: 10 and 6 → 36 + 4
		{0.1, 0, 4.0 / 40, 0.1},  // one: A takes it (saves 36, B's would save 4)
		{0.2, 0, 0, 0.2},         // two: both take one
		{0.5, 0, 0, 0.2},         // more allowed than useful: still no slack, no extra violations
		{0.1, 0.1, 40.0 / 40, 0}, // each series may violate on at most 10 % of 5 steps = 0
		{0.2, 0.2, 0, 0.2},       // each may take one
	}
	for _, c := range cases {
		o := res.OracleFleet(c.rate, c.cap)
		if !near(o.Slack, c.slack) || !near(o.ViolationRate, c.viol) {
			t.Errorf("rate %v cap %v: slack %v violation %v, want %v and %v", c.rate, c.cap, o.Slack, o.ViolationRate, c.slack, c.viol)
		}
	}
}

func TestConstCurveTiesAndZeros(t *testing.T) {
	c := newConstCurve([]float64{0, 0, 3, 3, 7})
	// Allocation 0 violates the three non-zero samples; 3 violates one and
	// leaves 3+3 slack; 7 violates none and leaves 7+7+4+4.
	want := []struct {
		a, slack float64
		v        int
	}{{0, 0, 3}, {3, 6, 1}, {7, 22, 0}}
	if len(c.alloc) != len(want) {
		t.Fatalf("curve %+v", c)
	}
	for i, w := range want {
		if c.alloc[i] != w.a || c.viol[i] != w.v || !near(c.slack[i], w.slack) {
			t.Errorf("point %d: %v %v %v, want %+v", i, c.alloc[i], c.viol[i], c.slack[i], w)
		}
	}
}
