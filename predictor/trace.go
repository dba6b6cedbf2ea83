package predictor

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
)

// Resource selects which column(s) of a trace form the usage series.
type Resource string

// The resources a trace can be replayed for.
const (
	CPU  Resource = "cpu"
	Mem  Resource = "mem"
	Disk Resource = "disk"
	Net  Resource = "net"
)

// ParseResource checks a resource name.
func ParseResource(s string) (Resource, error) {
	switch r := Resource(s); r {
	case CPU, Mem, Disk, Net:
		return r, nil
	}
	return "", fmt.Errorf("unknown resource %q (want cpu, mem, disk or net)", s)
}

// Series is one VM's usage of one resource, in time order.
type Series struct {
	VM   string
	T    []int64   // Unix seconds, strictly increasing
	V    []float64 // finite, non-negative
	Gaps int       // intervals longer than 1.5× the trace's step
}

// TraceReport says what loading a trace found and skipped.
type TraceReport struct {
	Format      string // "bitbrains" or "long"
	Files       int
	Rows        int      // data rows read
	NaN         int      // rows whose value was NaN or infinite (skipped)
	Negative    int      // rows whose value was negative (skipped)
	Duplicate   int      // rows repeating or going back in time (skipped)
	Gaps        int      // intervals longer than 1.5× the step (kept, models see the next sample)
	Zeros       int      // zero values (kept)
	Short       []string // VMs with fewer than 2 usable rows (skipped)
	StepSeconds int64    // the median interval between samples
}

// String is a one-paragraph summary for the CLI.
func (r TraceReport) String() string {
	s := fmt.Sprintf("format %s, %d file(s), %d rows, step %ds; skipped rows: %d NaN/Inf, %d negative, %d duplicate/out-of-order; kept: %d zeros, %d gaps",
		r.Format, r.Files, r.Rows, r.StepSeconds, r.NaN, r.Negative, r.Duplicate, r.Zeros, r.Gaps)
	if len(r.Short) > 0 {
		s += fmt.Sprintf("; %d series too short (<2 rows) skipped", len(r.Short))
	}
	return s
}

// LoadTrace reads a trace: a directory of Bitbrains (GWA-T-12) per-VM CSV
// files (plain or gzipped; vm_id = file name without extensions), a single
// such file, or a long CSV "vm_id,timestamp_s,value" (plain or gzipped;
// only cpu). The format is detected from the content. A malformed row is
// an error naming the file and line.
func LoadTrace(path string, res Resource) ([]Series, TraceReport, error) {
	var rep TraceReport
	st, err := os.Stat(path)
	if err != nil {
		return nil, rep, err
	}
	var raw []rawSeries
	if st.IsDir() {
		rep.Format = "bitbrains"
		ents, err := os.ReadDir(path)
		if err != nil {
			return nil, rep, err
		}
		var names []string
		for _, e := range ents {
			n := e.Name()
			if !e.IsDir() && (strings.HasSuffix(n, ".csv") || strings.HasSuffix(n, ".csv.gz")) {
				names = append(names, n)
			}
		}
		sortNatural(names)
		if len(names) == 0 {
			return nil, rep, fmt.Errorf("%s: no .csv or .csv.gz files", path)
		}
		for _, n := range names {
			s, err := loadFile(filepath.Join(path, n), res, &rep)
			if err != nil {
				return nil, rep, err
			}
			raw = append(raw, s...)
		}
	} else {
		raw, err = loadFile(path, res, &rep)
		if err != nil {
			return nil, rep, err
		}
	}
	out := finish(raw, &rep)
	return out, rep, nil
}

type rawSeries struct {
	vm string
	t  []int64
	v  []float64
}

func loadFile(path string, res Resource, rep *TraceReport) ([]rawSeries, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	rep.Files++
	r, err := maybeGunzip(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	br := bufio.NewReaderSize(r, 64<<10)
	first, _ := br.Peek(4096)
	if line, _, _ := bytes.Cut(first, []byte("\n")); bytes.Contains(line, []byte(";")) {
		if rep.Format == "" {
			rep.Format = "bitbrains"
		}
		s, err := parseBitbrains(path, vmName(path), br, res, rep)
		if err != nil {
			return nil, err
		}
		return []rawSeries{s}, nil
	}
	if rep.Format == "bitbrains" {
		return nil, fmt.Errorf("%s:1: not a Bitbrains file (no ';' in the header)", path)
	}
	rep.Format = "long"
	if res != CPU {
		return nil, fmt.Errorf("%s: a long vm_id,timestamp_s,cpu_pct trace has only cpu, not %s", path, res)
	}
	return parseLong(path, br, rep)
}

func maybeGunzip(b []byte) (io.Reader, error) {
	if len(b) >= 2 && b[0] == 0x1f && b[1] == 0x8b {
		zr, err := gzip.NewReader(bytes.NewReader(b))
		if err != nil {
			return nil, err
		}
		return zr, nil
	}
	return bytes.NewReader(b), nil
}

func vmName(path string) string {
	n := filepath.Base(path)
	if i := strings.IndexByte(n, '.'); i > 0 {
		n = n[:i]
	}
	return n
}

// bitbrainsCols maps a resource to the header names summed for it.
var bitbrainsCols = map[Resource][]string{
	CPU:  {"CPU usage [MHZ]"},
	Mem:  {"Memory usage [KB]"},
	Disk: {"Disk read throughput [KB/s]", "Disk write throughput [KB/s]"},
	Net:  {"Network received throughput [KB/s]", "Network transmitted throughput [KB/s]"},
}

// lineScanner yields lines with their 1-based numbers.
type lineScanner struct {
	sc   *bufio.Scanner
	line int
}

func newLineScanner(r io.Reader) *lineScanner {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	return &lineScanner{sc: sc}
}

func (l *lineScanner) next() (string, bool) {
	if !l.sc.Scan() {
		return "", false
	}
	l.line++
	return strings.TrimRight(l.sc.Text(), "\r"), true
}

// parseBitbrains parses one GWA-T-12 file: a header naming the columns,
// then rows separated by ';' (the real files add a tab after it).
func parseBitbrains(name, vm string, r io.Reader, res Resource, rep *TraceReport) (rawSeries, error) {
	s := rawSeries{vm: vm}
	ls := newLineScanner(r)
	hdr, ok := ls.next()
	if !ok {
		if err := ls.sc.Err(); err != nil {
			return s, fmt.Errorf("%s: %w", name, err)
		}
		return s, fmt.Errorf("%s:1: empty file, want a header", name)
	}
	cols := strings.Split(hdr, ";")
	idx := map[string]int{}
	for i, c := range cols {
		idx[strings.TrimSpace(c)] = i
	}
	tcol, ok := idx["Timestamp [ms]"]
	if !ok {
		return s, fmt.Errorf("%s:1: header has no \"Timestamp [ms]\" column", name)
	}
	var want []int
	for _, c := range bitbrainsCols[res] {
		i, ok := idx[c]
		if !ok {
			return s, fmt.Errorf("%s:1: header has no %q column", name, c)
		}
		want = append(want, i)
	}
	for {
		line, ok := ls.next()
		if !ok {
			break
		}
		if strings.TrimSpace(line) == "" {
			continue
		}
		f := strings.Split(line, ";")
		if len(f) != len(cols) {
			return s, fmt.Errorf("%s:%d: %d fields, header has %d", name, ls.line, len(f), len(cols))
		}
		ts, err := parseTimestamp(f[tcol])
		if err != nil {
			return s, fmt.Errorf("%s:%d: timestamp: %w", name, ls.line, err)
		}
		v := 0.0
		for _, i := range want {
			x, err := strconv.ParseFloat(strings.TrimSpace(f[i]), 64)
			if err != nil {
				return s, fmt.Errorf("%s:%d: column %q: %w", name, ls.line, strings.TrimSpace(cols[i]), err)
			}
			v += x
		}
		rep.Rows++
		if !keepValue(v, rep) {
			continue
		}
		s.t = append(s.t, ts)
		s.v = append(s.v, v)
	}
	if err := ls.sc.Err(); err != nil {
		return s, fmt.Errorf("%s:%d: %w", name, ls.line+1, err)
	}
	return s, nil
}

// parseLong parses "vm_id,timestamp_s,value" rows (an optional header line
// first) into one series per VM, in order of first appearance.
func parseLong(name string, r io.Reader, rep *TraceReport) ([]rawSeries, error) {
	ls := newLineScanner(r)
	byVM := map[string]int{}
	var out []rawSeries
	for {
		line, ok := ls.next()
		if !ok {
			break
		}
		if strings.TrimSpace(line) == "" {
			continue
		}
		f := strings.Split(line, ",")
		if len(f) != 3 {
			return nil, fmt.Errorf("%s:%d: %d fields, want 3 (vm_id,timestamp_s,cpu_pct)", name, ls.line, len(f))
		}
		if ls.line == 1 && strings.TrimSpace(f[0]) == "vm_id" {
			continue // header
		}
		vm := strings.TrimSpace(f[0])
		if vm == "" {
			return nil, fmt.Errorf("%s:%d: empty vm_id", name, ls.line)
		}
		ts, err := parseTimestamp(f[1])
		if err != nil {
			return nil, fmt.Errorf("%s:%d: timestamp: %w", name, ls.line, err)
		}
		v, err := strconv.ParseFloat(strings.TrimSpace(f[2]), 64)
		if err != nil {
			return nil, fmt.Errorf("%s:%d: value: %w", name, ls.line, err)
		}
		rep.Rows++
		if !keepValue(v, rep) {
			continue
		}
		i, ok := byVM[vm]
		if !ok {
			i = len(out)
			byVM[vm] = i
			out = append(out, rawSeries{vm: vm})
		}
		out[i].t = append(out[i].t, ts)
		out[i].v = append(out[i].v, v)
	}
	if err := ls.sc.Err(); err != nil {
		return nil, fmt.Errorf("%s:%d: %w", name, ls.line+1, err)
	}
	return out, nil
}

func parseTimestamp(s string) (int64, error) {
	s = strings.TrimSpace(s)
	if t, err := strconv.ParseInt(s, 10, 64); err == nil {
		return t, nil
	}
	f, err := strconv.ParseFloat(s, 64)
	if err != nil {
		return 0, err
	}
	if math.IsNaN(f) || math.IsInf(f, 0) || math.Abs(f) > 1e15 {
		return 0, fmt.Errorf("%q out of range", s)
	}
	return int64(f), nil
}

func keepValue(v float64, rep *TraceReport) bool {
	switch {
	case math.IsNaN(v) || math.IsInf(v, 0):
		rep.NaN++
		return false
	case v < 0:
		rep.Negative++
		return false
	case v == 0:
		rep.Zeros++
	}
	return true
}

// finish sorts each series by time, drops repeated timestamps, estimates
// the step and counts gaps, and sets short series aside.
func finish(raw []rawSeries, rep *TraceReport) []Series {
	var diffs []int64
	for i := range raw {
		s := &raw[i]
		if !sort.SliceIsSorted(s.t, func(a, b int) bool { return s.t[a] < s.t[b] }) {
			idx := make([]int, len(s.t))
			for j := range idx {
				idx[j] = j
			}
			sort.SliceStable(idx, func(a, b int) bool { return s.t[idx[a]] < s.t[idx[b]] })
			t2, v2 := make([]int64, len(idx)), make([]float64, len(idx))
			for j, k := range idx {
				t2[j], v2[j] = s.t[k], s.v[k]
			}
			s.t, s.v = t2, v2
		}
		k := 0
		for j := range s.t {
			if k > 0 && s.t[j] <= s.t[k-1] {
				rep.Duplicate++
				continue
			}
			s.t[k], s.v[k] = s.t[j], s.v[j]
			k++
		}
		s.t, s.v = s.t[:k], s.v[:k]
		for j := 1; j < len(s.t) && len(diffs) < 1<<16; j++ {
			diffs = append(diffs, s.t[j]-s.t[j-1])
		}
	}
	if len(diffs) > 0 {
		slices.Sort(diffs)
		rep.StepSeconds = diffs[(len(diffs)-1)/2]
	}
	var out []Series
	for _, s := range raw {
		if len(s.t) < 2 {
			rep.Short = append(rep.Short, s.vm)
			continue
		}
		gaps := 0
		for j := 1; j < len(s.t); j++ {
			if rep.StepSeconds > 0 && 2*(s.t[j]-s.t[j-1]) > 3*rep.StepSeconds {
				gaps++
			}
		}
		rep.Gaps += gaps
		out = append(out, Series{VM: s.vm, T: s.t, V: s.v, Gaps: gaps})
	}
	return out
}

// sortNatural orders names like 1.csv.gz, 2.csv.gz, 10.csv.gz numerically
// where their stems are numbers, else lexically.
func sortNatural(names []string) {
	sort.Slice(names, func(i, j int) bool {
		a, ea := strconv.Atoi(vmName(names[i]))
		b, eb := strconv.Atoi(vmName(names[j]))
		if ea == nil && eb == nil && a != b {
			return a < b
		}
		if (ea == nil) != (eb == nil) {
			return ea == nil
		}
		return names[i] < names[j]
	})
}
