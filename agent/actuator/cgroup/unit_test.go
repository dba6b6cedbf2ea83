package cgroup

import (
	"context"
	"errors"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ars-dev/ars/agent/cgroups"
)

func TestValidate(t *testing.T) {
	for _, c := range []struct {
		q    int64
		p    uint64
		ok   bool
		name string
	}{
		{-1, 100000, true, "unlimited"}, {1000, 1000, true, "min"}, {999, 100000, false, "quota too small"},
		{0, 100000, false, "zero quota"}, {-2, 100000, false, "negative"}, {50000, 999, false, "period small"},
		{50000, 1_000_001, false, "period large"}, {2_000_000, 1_000_000, true, "2 cpus at max period"},
	} {
		err := ValidateCPU(c.q, c.p)
		if (err == nil) != c.ok || (err != nil && !errors.Is(err, ErrInvalid)) {
			t.Errorf("%s: ValidateCPU(%d,%d) = %v", c.name, c.q, c.p, err)
		}
	}
	for w, ok := range map[uint64]bool{0: false, 1: true, 100: true, 10000: true, 10001: false} {
		if err := ValidateWeight(w); (err == nil) != ok {
			t.Errorf("ValidateWeight(%d) = %v", w, err)
		}
	}
	for _, c := range []struct {
		m  Memory
		ok bool
	}{{Memory{-1, -1}, true}, {Memory{1 << 30, -1}, true}, {Memory{1 << 30, 1 << 29}, true},
		{Memory{1 << 29, 1 << 30}, false}, {Memory{0, -1}, false}, {Memory{-5, -1}, false}, {Memory{-1, 1 << 30}, true}} {
		if err := ValidateMemory(c.m); (err == nil) != c.ok {
			t.Errorf("ValidateMemory(%+v) = %v", c.m, err)
		}
	}
}

func TestWeightShares(t *testing.T) {
	for _, c := range []struct{ w, s uint64 }{{100, 1024}, {1, 10}, {10000, 102400}, {50, 512}, {200, 2048}} {
		if got := WeightToShares(c.w); got != c.s {
			t.Errorf("WeightToShares(%d) = %d want %d", c.w, got, c.s)
		}
		if got := SharesToWeight(c.s); got != c.w {
			t.Errorf("SharesToWeight(%d) = %d want %d", c.s, got, c.w)
		}
	}
	if SharesToWeight(2) != 1 || SharesToWeight(262144) != 10000 {
		t.Errorf("clamp: %d %d", SharesToWeight(2), SharesToWeight(262144))
	}
}

func TestList(t *testing.T) {
	for in, want := range map[string]string{"0-3,5": "0-3,5", "5,0-3": "0-3,5", "1": "1", "": "", "0,1,2,4,5": "0-2,4-5"} {
		s, err := ParseList(in)
		if err != nil {
			t.Fatalf("ParseList(%q): %v", in, err)
		}
		if got := FormatList(s); got != want {
			t.Errorf("FormatList(ParseList(%q)) = %q want %q", in, got, want)
		}
	}
	for _, bad := range []string{"a", "3-1", "-1", "0-", "1,,2", "0-99999999"} {
		if _, err := ParseList(bad); !errors.Is(err, ErrInvalid) {
			t.Errorf("ParseList(%q) = %v, want ErrInvalid", bad, err)
		}
	}
	if err := validateSubset("cpus", "0-1", "0-3"); err != nil {
		t.Error(err)
	}
	if err := validateSubset("cpus", "2-4", "0-3"); err == nil || !strings.Contains(err.Error(), "extra 4") {
		t.Errorf("subset: %v", err)
	}
	if err := validateSubset("cpus", "", "0-3"); !errors.Is(err, ErrInvalid) {
		t.Errorf("empty: %v", err)
	}
}

func TestCPUOrder(t *testing.T) {
	for _, c := range []struct {
		oq     int64
		op     uint64
		q      int64
		p      uint64
		want   string
		reason string
	}{
		{50000, 100000, 10000, 20000, "QP", "lower period: quota first"},
		{10000, 20000, 50000, 100000, "PQ", "raise period: period first"},
		{50000, 100000, 20000, 100000, "Q", "same period"},
		{50000, 100000, 50000, 100000, "", "no change"},
		{-1, 100000, 50000, 200000, "PQ", "limit from unlimited"},
		{50000, 100000, -1, 20000, "QP", "unlimit"},
		{-1, 100000, -1, 20000, "P", "period only while unlimited"},
		{20000, 100000, 20000, 50000, "P", "quota unchanged: one write"},
	} {
		var got strings.Builder
		for _, s := range cpuOrder(c.oq, c.op, c.q, c.p,
			func() error { got.WriteString("Q"); return nil },
			func() error { got.WriteString("P"); return nil }) {
			_ = s()
		}
		if got.String() != c.want {
			t.Errorf("%s: (%d/%d)→(%d/%d) order %q want %q", c.reason, c.oq, c.op, c.q, c.p, got.String(), c.want)
		}
	}
}

func TestMargin(t *testing.T) {
	if Margin(0) != 64<<20 || Margin(10<<30) != 1<<30 {
		t.Fatal(Margin(0), Margin(10<<30))
	}
	if err := checkAboveUsage("x", 100<<20+64<<20-1, 100<<20); !errors.Is(err, ErrBelowUsage) {
		t.Fatal(err)
	}
	if err := checkAboveUsage("x", 100<<20+64<<20, 100<<20); err != nil {
		t.Fatal(err)
	}
	if err := checkAboveUsage("x", -1, 1<<40); err != nil {
		t.Fatal(err)
	}
}

func TestParseIOMax(t *testing.T) {
	m, err := ParseIOMax("8:0 rbps=1048576 wbps=max riops=max wiops=120\n7:1 rbps=max wbps=18446744073709551615 riops=max wiops=max\n")
	if err != nil {
		t.Fatal(err)
	}
	if m["8:0"] != (IOLimit{RBps: 1 << 20, WIOPS: 120}) || m["7:1"] != (IOLimit{}) {
		t.Fatalf("%+v", m)
	}
	if _, err := ParseIOMax("sda rbps=1"); err == nil {
		t.Fatal("bad device accepted")
	}
}

// ---- v2 on a fixture tree ----

type v2fix struct {
	root, sys string
	t         Target
	w         *Real
	writes    []string
}

func write(t *testing.T, path, v string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(v), 0o644); err != nil {
		t.Fatal(err)
	}
}

func read(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

func newV2(t *testing.T) *v2fix {
	f := &v2fix{root: t.TempDir(), sys: t.TempDir()}
	parent := filepath.Join(f.root, "machine")
	vm := filepath.Join(parent, "vm1")
	write(t, filepath.Join(parent, "cpuset.cpus.effective"), "0-3\n")
	write(t, filepath.Join(parent, "cpuset.mems.effective"), "0\n")
	for file, v := range map[string]string{
		"cpu.max": "max 100000\n", "cpu.weight": "100\n", "cpuset.cpus": "\n", "cpuset.mems": "\n",
		"memory.max": "max\n", "memory.high": "max\n", "memory.current": strconv.Itoa(100<<20) + "\n", "io.max": "",
	} {
		write(t, filepath.Join(vm, file), v)
	}
	write(t, filepath.Join(f.sys, "dev/block/7:0/size"), "0")
	write(t, filepath.Join(f.sys, "dev/block/8:1/partition"), "1")
	d := Dir{Path: vm, Mount: f.root, Version: cgroups.V2}
	f.t = Target{Name: "vm1", CPU: d, Cpuset: d, Memory: d, BlkIO: d}
	f.w = New(Paths{Sys: f.sys})
	f.w.Trace = func(file, value string) { f.writes = append(f.writes, filepath.Base(file)+"="+value) }
	return f
}

func (f *v2fix) file(t *testing.T, name string) string {
	return read(t, filepath.Join(f.t.CPU.Path, name))
}

func TestV2FixtureCPU(t *testing.T) {
	f := newV2(t)
	ctx := context.Background()
	if err := f.w.SetCPU(ctx, f.t, 50000, 100000); err != nil {
		t.Fatal(err)
	}
	if got := f.file(t, "cpu.max"); got != "50000 100000" {
		t.Fatalf("cpu.max %q", got)
	}
	if err := f.w.SetCPU(ctx, f.t, -1, 20000); err != nil {
		t.Fatal(err)
	}
	if got := f.file(t, "cpu.max"); got != "max 20000" {
		t.Fatalf("cpu.max %q", got)
	}
	if err := f.w.SetCPU(ctx, f.t, 500, 20000); !errors.Is(err, ErrInvalid) || f.file(t, "cpu.max") != "max 20000" {
		t.Fatalf("invalid quota: %v, file %q", err, f.file(t, "cpu.max"))
	}
	if err := f.w.SetCPUWeight(ctx, f.t, 250); err != nil || f.file(t, "cpu.weight") != "250" {
		t.Fatalf("weight: %v %q", err, f.file(t, "cpu.weight"))
	}
	s, err := f.w.Read(ctx, f.t)
	if err != nil || s.QuotaUs != -1 || s.PeriodUs != 20000 || s.Weight != 250 {
		t.Fatalf("read %+v %v", s, err)
	}
}

func TestV2FixtureCpuset(t *testing.T) {
	f := newV2(t)
	ctx := context.Background()
	if err := f.w.SetCpuset(ctx, f.t, "1-2", "0"); err != nil {
		t.Fatal(err)
	}
	if f.file(t, "cpuset.cpus") != "1-2" || f.file(t, "cpuset.mems") != "0" {
		t.Fatal(f.file(t, "cpuset.cpus"), f.file(t, "cpuset.mems"))
	}
	n := len(f.writes)
	for _, c := range [][2]string{{"2-5", "0"}, {"1", "1"}, {"x", ""}, {"", ""}} {
		if err := f.w.SetCpuset(ctx, f.t, c[0], c[1]); !errors.Is(err, ErrInvalid) {
			t.Errorf("SetCpuset(%q,%q) = %v", c[0], c[1], err)
		}
	}
	if len(f.writes) != n || f.file(t, "cpuset.cpus") != "1-2" {
		t.Fatalf("invalid cpuset wrote: %v", f.writes[n:])
	}
}

func TestV2FixtureIO(t *testing.T) {
	f := newV2(t)
	ctx := context.Background()
	if err := f.w.SetBlockIO(ctx, f.t, "7:0", IOLimit{WBps: 1 << 20, RIOPS: 100}); err != nil {
		t.Fatal(err)
	}
	// The fixture file keeps only the last write; the kernel merges keys per device.
	want := []string{"io.max=7:0 rbps=18446744073709551615", "io.max=7:0 wbps=1048576", "io.max=7:0 riops=100", "io.max=7:0 wiops=18446744073709551615"}
	if strings.Join(f.writes, "|") != strings.Join(want, "|") {
		t.Fatalf("writes %q", f.writes)
	}
	for _, dev := range []string{"8:1", "9:9", "sda", "7"} {
		if err := f.w.SetBlockIO(ctx, f.t, dev, IOLimit{WBps: 1}); !errors.Is(err, ErrInvalid) {
			t.Errorf("dev %s: %v", dev, err)
		}
	}
	if len(f.writes) != 4 {
		t.Fatalf("invalid device wrote: %v", f.writes)
	}
}

func TestV2FixtureMemoryStaging(t *testing.T) {
	f := newV2(t)
	ctx := context.Background()
	const MiB = 1 << 20
	// usage 100 MiB: 150 MiB < 100+64 → refused, nothing written.
	if err := f.w.SetMemory(ctx, f.t, Memory{Max: 150 * MiB, Soft: -1}); !errors.Is(err, ErrBelowUsage) || len(f.writes) != 0 {
		t.Fatalf("below usage: %v, writes %v", err, f.writes)
	}
	if err := f.w.SetMemory(ctx, f.t, Memory{Max: -1, Soft: 120 * MiB}); !errors.Is(err, ErrBelowUsage) || len(f.writes) != 0 {
		t.Fatalf("high below usage: %v, writes %v", err, f.writes)
	}
	// Lowering from max: high first, then max, then the final high.
	if err := f.w.SetMemory(ctx, f.t, Memory{Max: 300 * MiB, Soft: 250 * MiB}); err != nil {
		t.Fatal(err)
	}
	want := []string{"memory.high=314572800", "memory.max=314572800", "memory.high=262144000"}
	if strings.Join(f.writes, " ") != strings.Join(want, " ") {
		t.Fatalf("lowering order %v want %v", f.writes, want)
	}
	// Raising: max first, then high.
	f.writes = nil
	if err := f.w.SetMemory(ctx, f.t, Memory{Max: 500 * MiB, Soft: -1}); err != nil {
		t.Fatal(err)
	}
	want = []string{"memory.max=524288000", "memory.high=" + strconv.FormatInt(math.MaxInt64, 10)}
	if strings.Join(f.writes, " ") != strings.Join(want, " ") {
		t.Fatalf("raising order %v want %v", f.writes, want)
	}
	s, err := f.w.Read(ctx, f.t)
	if err != nil || s.MemMax != 500*MiB || s.MemSoft != -1 || s.MemUsage != 100*MiB {
		t.Fatalf("read %+v %v", s, err)
	}
}

func TestV2FixtureMemoryReclaimTimeout(t *testing.T) {
	f := newV2(t)
	const MiB = 1 << 20
	write(t, filepath.Join(f.t.Memory.Path, "memory.max"), strconv.Itoa(500*MiB))
	write(t, filepath.Join(f.t.Memory.Path, "memory.high"), strconv.Itoa(450*MiB))
	now := time.Unix(0, 0)
	f.w.Now = func() time.Time { return now }
	f.w.Sleep = func(d time.Duration) { now = now.Add(d) }
	f.w.ReclaimWait = time.Second
	// The guest grows between the check and the staging: usage stays above high.
	f.w.Trace = func(file, value string) {
		f.writes = append(f.writes, filepath.Base(file)+"="+value)
		if filepath.Base(file) == "memory.high" && value == strconv.Itoa(200*MiB) {
			write(t, filepath.Join(f.t.Memory.Path, "memory.current"), strconv.Itoa(250*MiB))
		}
	}
	err := f.w.SetMemory(context.Background(), f.t, Memory{Max: 200 * MiB, Soft: -1})
	if !errors.Is(err, ErrReclaimTimeout) {
		t.Fatalf("want ErrReclaimTimeout, got %v", err)
	}
	if got := f.file(t, "memory.max"); got != strconv.Itoa(500*MiB) {
		t.Fatalf("memory.max written on timeout: %s", got)
	}
	if got := f.file(t, "memory.high"); got != strconv.Itoa(450*MiB) {
		t.Fatalf("memory.high not restored: %s", got)
	}
	if now.Sub(time.Unix(0, 0)) < time.Second {
		t.Fatalf("gave up after %v", now.Sub(time.Unix(0, 0)))
	}
	// Reclaim succeeds within the wait: usage falls after a few polls.
	write(t, filepath.Join(f.t.Memory.Path, "memory.current"), strconv.Itoa(100*MiB))
	polls := 0
	f.w.Sleep = func(d time.Duration) {
		now = now.Add(d)
		if polls++; polls == 3 {
			write(t, filepath.Join(f.t.Memory.Path, "memory.current"), strconv.Itoa(150*MiB))
		}
	}
	if err := f.w.SetMemory(context.Background(), f.t, Memory{Max: 200 * MiB, Soft: -1}); err != nil {
		t.Fatal(err)
	}
	if polls != 3 || f.file(t, "memory.max") != strconv.Itoa(200*MiB) {
		t.Fatalf("polls %d max %s", polls, f.file(t, "memory.max"))
	}
}

func TestVanishedAndUnavailable(t *testing.T) {
	f := newV2(t)
	ctx := context.Background()
	if err := f.w.SetCPU(ctx, Target{}, 50000, 100000); !errors.Is(err, ErrUnavailable) {
		t.Fatal(err)
	}
	gone := f.t
	gone.CPU.Path = filepath.Join(f.root, "machine", "gone")
	if err := f.w.SetCPU(ctx, gone, 50000, 100000); !errors.Is(err, ErrVanished) {
		t.Fatal(err)
	}
}

func TestFake(t *testing.T) {
	f := &Fake{Usage: map[string]int64{"a": 1 << 30}, ParentCpus: "0-1"}
	ctx := context.Background()
	a := Target{Name: "a"}
	if err := f.SetCPU(ctx, a, 20000, 100000); err != nil {
		t.Fatal(err)
	}
	if err := f.SetMemory(ctx, a, Memory{Max: 1 << 30, Soft: -1}); !errors.Is(err, ErrBelowUsage) {
		t.Fatal(err)
	}
	if err := f.SetCpuset(ctx, a, "0-2", ""); !errors.Is(err, ErrInvalid) {
		t.Fatal(err)
	}
	if err := f.SetBlockIO(ctx, a, "7:0", IOLimit{WBps: 5}); err != nil {
		t.Fatal(err)
	}
	s, _ := f.Read(ctx, a)
	if s.QuotaUs != 20000 || s.MemMax != -1 || s.IO["7:0"].WBps != 5 || s.MemUsage != 1<<30 {
		t.Fatalf("%+v", s)
	}
	if c := f.Calls(); len(c) != 5 || c[1].Err == nil || c[0].Args != "20000 100000" {
		t.Fatalf("%+v", c)
	}
}
