package predictor

import (
	"bytes"
	"compress/gzip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

const bbHeader = "Timestamp [ms];\tCPU cores;\tCPU capacity provisioned [MHZ];\tCPU usage [MHZ];\tCPU usage [%];\tMemory capacity provisioned [KB];\tMemory usage [KB];\tDisk read throughput [KB/s];\tDisk write throughput [KB/s];\tNetwork received throughput [KB/s];\tNetwork transmitted throughput [KB/s]\n"

func bbRow(ts int, cpu, mem, dr, dw, nr, nt string) string {
	return strconv.Itoa(ts) + ";\t2;\t5851.9989;\t" + cpu + ";\t1.5;\t8218624.0;\t" + mem + ";\t" + dr + ";\t" + dw + ";\t" + nr + ";\t" + nt + "\n"
}

func writeGz(t *testing.T, path, s string) {
	t.Helper()
	var b bytes.Buffer
	zw := gzip.NewWriter(&b)
	zw.Write([]byte(s))
	zw.Close()
	if err := os.WriteFile(path, b.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestLoadBitbrainsDir(t *testing.T) {
	dir := t.TempDir()
	writeGz(t, filepath.Join(dir, "10.csv.gz"), bbHeader+
		bbRow(1000, "87.7799835", "100", "1", "2", "0.25", "0.5")+
		bbRow(1300, "NaN", "100", "1", "2", "0.25", "0.5")+
		bbRow(1600, "0", "100", "1", "2", "0.25", "0.5")+
		bbRow(1600, "5", "100", "1", "2", "0.25", "0.5")+ // duplicate time
		bbRow(3100, "29.25", "100", "1", "2", "0.25", "0.5")) // a gap
	os.WriteFile(filepath.Join(dir, "2.csv"), []byte(bbHeader+
		bbRow(1000, "1", "1", "1", "1", "1", "1")+bbRow(1300, "2", "2", "2", "2", "2", "2")+bbRow(1600, "3", "3", "3", "3", "3", "3")), 0o644)
	os.WriteFile(filepath.Join(dir, "3.csv"), []byte(bbHeader+bbRow(1000, "1", "1", "1", "1", "1", "1")), 0o644)
	os.WriteFile(filepath.Join(dir, "notes.txt"), []byte("ignored"), 0o644)

	s, rep, err := LoadTrace(dir, CPU)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Format != "bitbrains" || len(s) != 2 || s[0].VM != "2" || s[1].VM != "10" {
		t.Fatalf("report %+v series %+v", rep, s)
	}
	if got := s[1].V; len(got) != 3 || got[0] != 87.7799835 || got[1] != 0 || got[2] != 29.25 {
		t.Fatalf("vm 10 values %v", got)
	}
	if rep.NaN != 1 || rep.Duplicate != 1 || rep.Zeros != 1 || rep.Gaps != 2 || rep.StepSeconds != 300 ||
		len(rep.Short) != 1 || rep.Short[0] != "3" {
		t.Fatalf("report %+v", rep)
	}
	if !strings.Contains(rep.String(), "1 NaN") {
		t.Fatalf("report text %q", rep.String())
	}
	// disk = read + write, net = received + transmitted
	d, _, err := LoadTrace(dir, Disk)
	if err != nil || d[0].V[2] != 6 {
		t.Fatalf("disk %v %v", d, err)
	}
	n, _, err := LoadTrace(dir, Net)
	if err != nil || n[1].V[0] != 0.75 {
		t.Fatalf("net %v %v", n, err)
	}
	m, _, err := LoadTrace(dir, Mem)
	if err != nil || m[0].V[1] != 2 {
		t.Fatalf("mem %v %v", m, err)
	}
}

func TestLoadLong(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "pl.csv.gz")
	writeGz(t, p, "vm_id,timestamp_s,cpu_pct\nb,600,3\na,0,1\nb,0,2\na,300,0.5\nb,300,7\n")
	s, rep, err := LoadTrace(p, CPU)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Format != "long" || len(s) != 2 || s[0].VM != "b" || len(s[0].V) != 3 || s[0].V[0] != 2 || s[0].V[2] != 3 || s[1].V[1] != 0.5 {
		t.Fatalf("%+v %+v", rep, s)
	}
	if _, _, err := LoadTrace(p, Mem); err == nil {
		t.Fatal("long trace accepted for mem")
	}
}

func TestMalformedRowsNameFileAndLine(t *testing.T) {
	dir := t.TempDir()
	cases := map[string]string{
		"bad.csv":   bbHeader + bbRow(1000, "1", "1", "1", "1", "1", "1") + bbRow(1300, "x1", "1", "1", "1", "1", "1"),
		"short.csv": bbHeader + bbRow(1000, "1", "1", "1", "1", "1", "1") + "1300;\t2\n",
		"ts.csv":    bbHeader + bbRow(1000, "1", "1", "1", "1", "1", "1") + strings.Replace(bbRow(1300, "1", "1", "1", "1", "1", "1"), "1300", "soon", 1),
	}
	for name, body := range cases {
		p := filepath.Join(dir, name)
		os.WriteFile(p, []byte(body), 0o644)
		_, _, err := LoadTrace(p, CPU)
		if err == nil || !strings.Contains(err.Error(), name+":3") {
			t.Errorf("%s: error %v, want it to name %s:3", name, err, name)
		}
	}
	p := filepath.Join(dir, "long.csv")
	os.WriteFile(p, []byte("vm_id,timestamp_s,cpu_pct\na,0,1\na,300\n"), 0o644)
	if _, _, err := LoadTrace(p, CPU); err == nil || !strings.Contains(err.Error(), "long.csv:3") {
		t.Errorf("long: %v", err)
	}
	p = filepath.Join(dir, "nohdr.csv")
	os.WriteFile(p, []byte("Timestamp [ms];\tfoo\n1;\t2\n"), 0o644)
	if _, _, err := LoadTrace(p, CPU); err == nil || !strings.Contains(err.Error(), "nohdr.csv:1") {
		t.Errorf("header: %v", err)
	}
	if _, _, err := LoadTrace(filepath.Join(dir, "missing"), CPU); err == nil {
		t.Error("missing path accepted")
	}
}

func FuzzParseBitbrains(f *testing.F) {
	f.Add(bbHeader + bbRow(1000, "87.7", "1", "1", "1", "1", "1") + bbRow(1300, "NaN", "1", "1", "1", "1", "1"))
	f.Add(bbHeader + "1;\t2\n")
	f.Add("")
	f.Fuzz(func(t *testing.T, in string) {
		var rep TraceReport
		s, err := parseBitbrains("f", "vm", strings.NewReader(in), CPU, &rep)
		if err != nil {
			if !strings.HasPrefix(err.Error(), "f:") {
				t.Fatalf("error without file name: %v", err)
			}
			return
		}
		checkRaw(t, []rawSeries{s}, &rep)
	})
}

func FuzzParseLong(f *testing.F) {
	f.Add("vm_id,timestamp_s,cpu_pct\na,0,1\nb,300,2\na,300,NaN\n")
	f.Add("a,1e3,-1\n")
	f.Fuzz(func(t *testing.T, in string) {
		var rep TraceReport
		raw, err := parseLong("f", strings.NewReader(in), &rep)
		if err != nil {
			if !strings.HasPrefix(err.Error(), "f:") {
				t.Fatalf("error without file name: %v", err)
			}
			return
		}
		checkRaw(t, raw, &rep)
	})
}

// checkRaw asserts what every successfully parsed trace must satisfy
// after finish: sorted, finite, non-negative series of ≥ 2 samples that
// the models accept.
func checkRaw(t *testing.T, raw []rawSeries, rep *TraceReport) {
	for _, s := range finish(raw, rep) {
		if len(s.T) != len(s.V) || len(s.V) < 2 {
			t.Fatalf("series %+v", s)
		}
		m := NewARS(0.02)
		for i, v := range s.V {
			if i > 0 && s.T[i] <= s.T[i-1] {
				t.Fatalf("not increasing: %v", s.T)
			}
			if err := m.Observe(v); err != nil {
				t.Fatalf("parsed value rejected: %v", err)
			}
		}
	}
}
