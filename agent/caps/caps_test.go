package caps

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func writeStatus(t *testing.T, capEff, uid string) string {
	t.Helper()
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "self"), 0o755)
	body := "Name:\tarsd\nUid:\t" + uid + "\nCapInh:\t0000000000000000\nCapPrm:\t" + capEff + "\nCapEff:\t" + capEff + "\n"
	if err := os.WriteFile(filepath.Join(dir, "self", "status"), []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestReadAndCheck(t *testing.T) {
	full := Set(0x000001ffffffffff)
	cases := []struct {
		name string
		set  Set
		uid  string
		off  []Feature
	}{
		{"everything", full, "0\t0\t0\t0", nil},
		{"no net admin", full.Without(NetAdmin), "0\t0\t0\t0", []Feature{NetShaping}},
		{"collector set", Set(0).Without().withCaps(BPF, PerfMon), "0\t0\t0\t0",
			[]Feature{ProgramStats, NetShaping, QMPForeign}},
		{"bpf without perfmon", Set(0).withCaps(BPF, NetAdmin, DACOverride), "0\t0\t0\t0",
			[]Feature{EBPF, ProgramStats}},
		{"unprivileged user", 0, "1000\t1000\t1000\t1000",
			[]Feature{EBPF, ProgramStats, NetShaping, CgroupWrites, QMPForeign}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p, err := Read(writeStatus(t, strings.TrimPrefix(hex16(uint64(c.set)), "0x"), c.uid))
			if err != nil {
				t.Fatal(err)
			}
			if p.Effective != c.set {
				t.Fatalf("read %x, want %x", p.Effective, c.set)
			}
			r := Check(p)
			var off []Feature
			for _, s := range r.Off() {
				off = append(off, s.Feature)
				if s.Why == "" || !strings.Contains(s.Why, "CAP_") {
					t.Errorf("%s off without naming the capability: %q", s.Feature, s.Why)
				}
			}
			if strings.Join(feats(off), "|") != strings.Join(feats(c.off), "|") {
				t.Fatalf("off = %v, want %v", off, c.off)
			}
		})
	}
	r := Check(Process{Effective: full.Without(NetAdmin), EUID: 0})
	if s := r.Summary(); !strings.Contains(s, "network shaping (tc) off: no CAP_NET_ADMIN") {
		t.Fatalf("summary %q", s)
	}
	if r.On(NetShaping) || !r.On(EBPF) {
		t.Fatal("On")
	}
	if s := Check(Process{Effective: full, EUID: 0}).Summary(); s != "all privileged features on" {
		t.Fatalf("summary %q", s)
	}
}

func TestReadErrors(t *testing.T) {
	if _, err := Read(t.TempDir()); err == nil {
		t.Fatal("missing status accepted")
	}
	if _, err := Read(writeStatus(t, "zz", "0")); err == nil {
		t.Fatal("bad CapEff accepted")
	}
}

// TestReadSelf reads the real process: the set must parse and name
// capabilities the kernel knows.
func TestReadSelf(t *testing.T) {
	p, err := Read("/proc")
	if err != nil {
		t.Fatal(err)
	}
	if p.EUID != os.Geteuid() {
		t.Fatalf("euid %d, want %d", p.EUID, os.Geteuid())
	}
	t.Logf("effective: %s", p.Effective)
	t.Logf("features: %s", Check(p).Summary())
}

func (s Set) withCaps(cs ...Cap) Set {
	for _, c := range cs {
		s |= 1 << c
	}
	return s
}

func hex16(v uint64) string {
	const digits = "0123456789abcdef"
	b := make([]byte, 16)
	for i := 15; i >= 0; i-- {
		b[i] = digits[v&0xf]
		v >>= 4
	}
	return string(b)
}

func feats(fs []Feature) []string {
	out := make([]string, len(fs))
	for i, f := range fs {
		out[i] = string(f)
	}
	return out
}
