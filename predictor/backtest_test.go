package predictor

import (
	"bytes"
	"encoding/csv"
	"math"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/ars-dev/ars/internal/testutil"
)

func sharedData(t testing.TB) string { return testutil.SharedData(t) }

func TestBacktestProtocolAndOutput(t *testing.T) {
	s := []Series{{VM: "a", T: []int64{0, 300, 600, 900}, V: []float64{1, 0.1 + 0.2, 3, 2}}}
	res, err := Backtest(s, BacktestConfig{Models: []string{"last", "max-1h"}, Alpha: 0.02, Step: 5 * time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	// last: allocations 1, 0.3, 3 for usages 0.3, 3, 2 → one violation,
	// slack (0.7 + 1) / 5.3.
	r := res.Models[0]
	if r.Steps != 3 || r.Violations != 1 || math.Abs(r.Slack-1.7/5.3) > 1e-12 {
		t.Fatalf("%+v", r)
	}
	// Hindsight: K such that the violation rate is 0 → K = 10 (3/0.3).
	if h := res.HindsightMargin(0, 0); math.Abs(h.K-10) > 1e-9 || h.ViolationRate != 0 {
		t.Fatalf("hindsight %+v", h)
	}
	var b bytes.Buffer
	if err := res.WriteAllocations(&b, 0); err != nil {
		t.Fatal(err)
	}
	rows, err := csv.NewReader(&b).ReadAll()
	if err != nil || len(rows) != 4 || rows[0][0] != "vm_id" {
		t.Fatalf("%v %v", rows, err)
	}
	for i, row := range rows[1:] {
		u, _ := strconv.ParseFloat(row[2], 64)
		if u != s[0].V[i+1] || row[1] != strconv.FormatInt(s[0].T[i+1], 10) {
			t.Fatalf("row %v does not round-trip", row)
		}
	}
	var sum bytes.Buffer
	res.WriteSummary(&sum, 0.02, 0)
	if !bytes.Contains(sum.Bytes(), []byte("hindsight")) || !bytes.Contains(sum.Bytes(), []byte("const, same per-VM violations")) {
		t.Fatalf("summary:\n%s", sum.String())
	}
}

// TestSharedTracesCalibrated replays both shared traces (CPU) and checks
// the calibrated ensemble lands in the goal's violation band. Slack is
// reported, not asserted (see docs/BENCHMARKS.md).
func TestSharedTracesCalibrated(t *testing.T) {
	if testing.Short() {
		t.Skip("short")
	}
	d := sharedData(t)
	for _, tr := range []string{"bitbrains-rnd-2013-7", "planetlab-20110303.csv.gz"} {
		series, rep, err := LoadTrace(filepath.Join(d, tr), CPU)
		if err != nil {
			t.Fatal(err)
		}
		models := append([]string{"ars"}, BaselineNames()...)
		res, err := Backtest(series, BacktestConfig{Models: models, Alpha: 0.02, Step: time.Duration(rep.StepSeconds) * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		var b bytes.Buffer
		res.WriteSummary(&b, 0.02, 0)
		t.Logf("%s: %s\n%s", tr, rep, b.String())
		v := res.Models[0].ViolationRate()
		if v < 0.01 || v > 0.025 {
			t.Errorf("%s: ars violation %.4f outside [1%%, 2.5%%]", tr, v)
		}
		// The hindsight references: more freedom to place violations can
		// only lower the least slack, and none exceeds the rate it was given.
		same, capped, free := res.OracleSameViolations(0), res.OracleFleet(v, 0.04), res.OracleFleet(v, 0)
		if free.Slack > capped.Slack+1e-12 || capped.ViolationRate > v || free.ViolationRate > v || same.ViolationRate > v {
			t.Errorf("%s: references out of order: same %+.4f/%.4f capped %.4f/%.4f free %.4f/%.4f (rate %.4f)", tr,
				same.Slack, same.ViolationRate, capped.Slack, capped.ViolationRate, free.Slack, free.ViolationRate, v)
		}
	}
}

func BenchmarkObserveForecast(b *testing.B) {
	for _, name := range ModelNames() {
		b.Run(name, func(b *testing.B) {
			m, _ := NewByName(name, 0.02, 5*time.Minute)
			xs := make([]float64, 4096)
			for i := range xs {
				xs[i] = 100 + 50*math.Sin(float64(i)/7) + float64(i%13)
			}
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

// BenchmarkBacktestBitbrains is the speed goal: 100 VMs × ~8,600 steps,
// the calibrated ensemble plus the five baselines, load included.
func BenchmarkBacktestBitbrains(b *testing.B) {
	d := sharedData(b)
	for i := 0; i < b.N; i++ {
		series, rep, err := LoadTrace(filepath.Join(d, "bitbrains-rnd-2013-7"), CPU)
		if err != nil {
			b.Fatal(err)
		}
		models := append([]string{"ars"}, BaselineNames()...)
		if _, err := Backtest(series, BacktestConfig{Models: models, Alpha: 0.02, Step: time.Duration(rep.StepSeconds) * time.Second}); err != nil {
			b.Fatal(err)
		}
	}
}
