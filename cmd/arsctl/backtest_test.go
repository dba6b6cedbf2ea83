package main

import (
	"bytes"
	"encoding/csv"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

func TestBacktestCommand(t *testing.T) {
	dir := t.TempDir()
	trace := filepath.Join(dir, "pl.csv")
	var b strings.Builder
	b.WriteString("vm_id,timestamp_s,cpu_pct\n")
	for i := 0; i < 200; i++ {
		for _, vm := range []string{"a", "b"} {
			v := strconv.FormatFloat(float64(i%17)*0.1+0.3, 'g', -1, 64)
			b.WriteString(vm + "," + strconv.Itoa(1299110400+300*i) + "," + v + "\n")
		}
	}
	os.WriteFile(trace, []byte(b.String()), 0o644)
	out := filepath.Join(dir, "alloc.csv")
	var stdout bytes.Buffer
	err := run([]string{"backtest", "--trace", trace, "--resource", "cpu", "--target-violation", "0.02", "--out", out, "--model", "ars"}, &stdout)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"format long", "ars", "vpa-p90-24h", "max-6h", "hindsight", "wrote ars"} {
		if !strings.Contains(stdout.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, stdout.String())
		}
	}
	f, _ := os.Open(out)
	defer f.Close()
	rows, err := csv.NewReader(f).ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != 1+2*199 || strings.Join(rows[0], ",") != "vm_id,timestamp_s,usage,allocation" {
		t.Fatalf("%d rows, header %v", len(rows), rows[0])
	}
	// usage parses back to the trace's number (0.1·k + 0.3 is not exact in binary)
	if rows[1][0] != "a" || rows[1][1] != "1299110700" || rows[1][2] != strconv.FormatFloat(0.1+0.3, 'g', -1, 64) {
		t.Fatalf("row %v", rows[1])
	}
	// --horizon scores ars h steps ahead: one row per h.
	stdout.Reset()
	if err := run([]string{"backtest", "--trace", trace, "--models", "ars", "--horizon", "3"}, &stdout); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"ars 3 steps ahead", "\n1 ", "\n3 "} {
		if !strings.Contains(stdout.String(), want) {
			t.Errorf("horizon output lacks %q:\n%s", want, stdout.String())
		}
	}
	if err := run([]string{"backtest", "--trace", trace, "--horizon", "99"}, &stdout); err == nil {
		t.Error("horizon 99 accepted")
	}
	// errors: bad flag values and a malformed trace name the file and line
	if err := run([]string{"backtest", "--trace", trace, "--resource", "gpu"}, &stdout); err == nil {
		t.Error("gpu accepted")
	}
	if err := run([]string{"backtest", "--trace", trace, "--model", "nope"}, &stdout); err == nil {
		t.Error("unknown model accepted")
	}
	os.WriteFile(trace, []byte("vm_id,timestamp_s,cpu_pct\na,0,1\na,300,zz\n"), 0o644)
	if err := run([]string{"backtest", "--trace", trace}, &stdout); err == nil || !strings.Contains(err.Error(), "pl.csv:3") {
		t.Errorf("malformed: %v", err)
	}
}
