package main

import (
	"bytes"
	"encoding/csv"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/ars-dev/ars/internal/testutil"
)

func sharedData(t testing.TB) string { return testutil.SharedData(t) }

type simRow struct {
	vm                                string
	ts                                int64
	usage, demand, alloc, floor, ceil float64
	class                             string
	borrowed, lent                    float64
	throttled                         bool
}

func readSimRows(t *testing.T, path string) []simRow {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	recs, err := csv.NewReader(f).ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(recs[0], ","); got != "vm_id,timestamp_s,usage,demand,allocation,floor,ceiling,priority,borrowed,lent,throttled" {
		t.Fatalf("header %q", got)
	}
	num := func(s string) float64 {
		x, err := strconv.ParseFloat(s, 64)
		if err != nil {
			t.Fatal(err)
		}
		return x
	}
	rows := make([]simRow, 0, len(recs)-1)
	for _, r := range recs[1:] {
		cls, _, _ := strings.Cut(r[7], ":")
		rows = append(rows, simRow{vm: r[0], ts: int64(num(r[1])), usage: num(r[2]), demand: num(r[3]), alloc: num(r[4]),
			floor: num(r[5]), ceil: num(r[6]), class: cls, borrowed: num(r[8]), lent: num(r[9]), throttled: r[10] == "1"})
	}
	return rows
}

// The invariants on the Bitbrains trace (a subset to stay fast):
// allocations never sum above capacity, none is below its floor, and on
// contended steps higher priority is short less often than lower.
func TestSimulateBitbrainsInvariants(t *testing.T) {
	dir := filepath.Join(sharedData(t), "bitbrains-rnd-2013-7")
	outFile := filepath.Join(t.TempDir(), "sim.csv")
	var out bytes.Buffer
	err := run([]string{"simulate", "--trace", dir, "--capacity", "cpu=60%", "--vms", "30", "--steps", "1500", "--out", outFile}, &out)
	if err != nil {
		t.Fatal(err)
	}
	t.Log(out.String())
	rows := readSimRows(t, outFile)
	if len(rows) != 30*1500 {
		t.Fatalf("%d rows", len(rows))
	}
	// Capacity as printed.
	m := strings.Split(out.String(), "cpu capacity ")
	if len(m) < 2 {
		t.Fatal("no capacity in the output")
	}
	capa, err := strconv.ParseFloat(strings.Fields(m[1])[0], 64)
	if err != nil {
		t.Fatal(err)
	}
	type agg struct{ alloc, demand float64 }
	byT := map[int64]*agg{}
	for _, r := range rows {
		if r.alloc < r.floor {
			t.Fatalf("%s at %d: allocation %v below floor %v", r.vm, r.ts, r.alloc, r.floor)
		}
		if r.alloc > r.ceil {
			t.Fatalf("%s at %d: allocation %v above ceiling %v", r.vm, r.ts, r.alloc, r.ceil)
		}
		if r.throttled != (r.alloc < r.demand) {
			t.Fatalf("%s at %d: throttled flag %v but allocation %v, demand %v", r.vm, r.ts, r.throttled, r.alloc, r.demand)
		}
		a := byT[r.ts]
		if a == nil {
			a = &agg{}
			byT[r.ts] = a
		}
		a.alloc += r.alloc
		a.demand += r.demand
	}
	for ts, a := range byT {
		if a.alloc > capa*(1+1e-9) {
			t.Fatalf("at %d allocations sum to %v, above capacity %v", ts, a.alloc, capa)
		}
	}
	short := map[string]int{}
	steps := map[string]int{}
	loans := 0
	for _, r := range rows {
		if r.borrowed > 0 {
			loans++
		}
		if byT[r.ts].demand > capa {
			steps[r.class]++
			if r.alloc < r.demand {
				short[r.class]++
			}
		}
	}
	rate := func(c string) float64 { return float64(short[c]) / float64(max(steps[c], 1)) }
	t.Logf("short on contended steps: critical %.4f standard %.4f best-effort %.4f (%d VM-steps); %d borrowing VM-steps",
		rate("critical"), rate("standard"), rate("best-effort"), steps["critical"], loans)
	if steps["critical"] == 0 {
		t.Fatal("no contention: the test exercises nothing")
	}
	if !(rate("critical") <= rate("standard") && rate("standard") <= rate("best-effort")) || rate("critical") >= rate("best-effort") {
		t.Fatal("higher priority is not short less often than lower")
	}
	if loans == 0 {
		t.Fatal("no loans under contention")
	}
}

func TestSimulateSLAFileAndErrors(t *testing.T) {
	d := t.TempDir()
	trace := filepath.Join(d, "long.csv")
	var b strings.Builder
	b.WriteString("vm_id,timestamp_s,cpu_pct\n")
	for k := 0; k < 200; k++ {
		hi := 10.0
		if k%40 >= 20 {
			hi = 50
		}
		b.WriteString("web," + strconv.Itoa(k*300) + "," + strconv.FormatFloat(hi, 'f', 1, 64) + "\n")
		b.WriteString("batch," + strconv.Itoa(k*300) + ",70\n")
	}
	if err := os.WriteFile(trace, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	sla := filepath.Join(d, "sla.yaml")
	if err := os.WriteFile(sla, []byte("vms:\n  web:\n    cpu: {floorMillicores: 10, ceilingMillicores: 100}\n    class: critical\n  batch:\n    cpu: {floorMillicores: 10, ceilingMillicores: 100}\n    class: best-effort\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	outFile := filepath.Join(d, "out.csv")
	var out bytes.Buffer
	if err := run([]string{"simulate", "--trace", trace, "--capacity", "cpu=100", "--sla", sla, "--out", outFile}, &out); err != nil {
		t.Fatal(err)
	}
	rows := readSimRows(t, outFile)
	lent, webShort := 0, 0
	for _, r := range rows {
		if r.vm == "batch" && r.lent > 0 {
			lent++
		}
		if r.vm == "web" && r.class != "critical" {
			t.Fatalf("class %q", r.class)
		}
		if r.vm == "web" && r.throttled && r.alloc < 90 {
			webShort++ // short although batch had more than its floor (10) to lend
		}
	}
	if lent == 0 || webShort > 0 {
		t.Fatalf("batch lent on %d steps, web short below 90 on %d:\n%s", lent, webShort, out.String())
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--trace", trace, "--out", outFile}, "required"},
		{[]string{"--trace", trace, "--capacity", "mem=5", "--out", outFile}, "cpu=... is required"},
		{[]string{"--trace", trace, "--capacity", "cpu=-5", "--out", outFile}, "not a positive amount"},
		{[]string{"--trace", trace, "--capacity", "gpu=5", "--out", outFile}, "unknown resource"},
		{[]string{"--trace", trace, "--capacity", "cpu=15", "--sla", sla, "--out", outFile}, "floors sum"},
		{[]string{"--trace", trace, "--capacity", "cpu=100", "--sla", trace, "--out", outFile}, "sla file"},
	} {
		err := run(append([]string{"simulate"}, c.args...), &out)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v: want %q, got %v", c.args, c.want, err)
		}
	}
}
