package executor

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ars-dev/ars/agent/cgroups"
)

// writeLog makes a log of n chained records and returns its path.
func writeLog(t *testing.T, n int) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := OpenAudit(path)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < n; i++ {
		if err := l.Append(Record{Time: time.Unix(int64(i), 0).UTC(), VM: "vm", Kind: "cpu.quota",
			Before: "1", After: "2", Reason: "r", Epoch: 1, Result: "applied"}); err != nil {
			t.Fatal(err)
		}
	}
	if h := l.Head(); h.Seq != uint64(n) {
		t.Fatalf("head seq %d", h.Seq)
	}
	l.Close()
	return path
}

func lines(t *testing.T, path string) [][]byte {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return bytes.SplitAfter(b, []byte("\n"))[:bytes.Count(b, []byte("\n"))]
}

func TestAuditChainIntact(t *testing.T) {
	path := writeLog(t, 5)
	h, err := VerifyFile(path)
	if err != nil || h.Seq != 5 {
		t.Fatalf("intact log: %+v %v", h, err)
	}
	// Reopening resumes the chain.
	l, err := OpenAudit(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Append(Record{VM: "x"}); err != nil {
		t.Fatal(err)
	}
	l.Close()
	if h, err := VerifyFile(path); err != nil || h.Seq != 6 {
		t.Fatalf("after reopen: %+v %v", h, err)
	}
	if h, err := VerifyFile(filepath.Join(t.TempDir(), "none.log")); err != nil || h.Seq != 0 {
		t.Fatalf("absent log: %+v %v", h, err)
	}
}

func TestAuditTamperingDetected(t *testing.T) {
	cases := []struct {
		name   string
		tamper func(ls [][]byte) [][]byte
		line   int
	}{
		{"edit a field", func(ls [][]byte) [][]byte {
			ls[2] = bytes.Replace(ls[2], []byte(`"after":"2"`), []byte(`"after":"9"`), 1)
			return ls
		}, 4},
		{"delete a middle line", func(ls [][]byte) [][]byte { return append(ls[:1], ls[2:]...) }, 2},
		{"reorder two lines", func(ls [][]byte) [][]byte { ls[1], ls[2] = ls[2], ls[1]; return ls }, 2},
		{"cut lines from the end", func(ls [][]byte) [][]byte { return ls[:3] }, 4},
		{"cut inside the last line", func(ls [][]byte) [][]byte {
			ls[4] = ls[4][:len(ls[4])/2]
			return ls
		}, 5},
		{"insert a forged line", func(ls [][]byte) [][]byte {
			return append(ls[:2], append([][]byte{[]byte(`{"seq":3,"vm":"evil","prev":"` + GenesisHash + `"}` + "\n")}, ls[2:]...)...)
		}, 3},
		{"not JSON", func(ls [][]byte) [][]byte { ls[0] = []byte("garbage\n"); return ls }, 1},
		{"unknown field", func(ls [][]byte) [][]byte {
			ls[0] = bytes.Replace(ls[0], []byte(`{"seq"`), []byte(`{"x":1,"seq"`), 1)
			return ls
		}, 1},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			path := writeLog(t, 5)
			ls := c.tamper(lines(t, path))
			if err := os.WriteFile(path, bytes.Join(ls, nil), 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := VerifyFile(path)
			var ve *VerifyError
			if !errors.As(err, &ve) {
				t.Fatalf("tampered log verified: %v", err)
			}
			if ve.Line != c.line {
				t.Fatalf("first bad line %d (%v), want %d", ve.Line, err, c.line)
			}
			// Opening it never extends nor deletes it: it moves aside and a
			// new chain starts, whose first record says so.
			l, err := OpenAudit(path)
			if err != nil {
				t.Fatal(err)
			}
			l.Close()
			if l.Rotated == "" {
				t.Fatal("OpenAudit kept a tampered log in place")
			}
			if b, err := os.ReadFile(l.Rotated); err != nil || !bytes.Equal(b, bytes.Join(ls, nil)) {
				t.Fatalf("tampered log not preserved at %s: %v", l.Rotated, err)
			}
			if h, err := VerifyFile(path); err != nil || h.Seq != 1 {
				t.Fatalf("new chain: %+v %v", h, err)
			}
			if recs := readAudit(t, path); recs[0].Kind != "audit.rotate" || recs[0].Target != l.Rotated {
				t.Fatalf("first record of the new chain %+v", recs[0])
			}
		})
	}
	t.Run("head file removed", func(t *testing.T) {
		path := writeLog(t, 2)
		os.Remove(path + ".head")
		if _, err := VerifyFile(path); err == nil || !strings.Contains(err.Error(), "head") {
			t.Fatalf("missing head: %v", err)
		}
	})
	t.Run("log removed", func(t *testing.T) {
		path := writeLog(t, 2)
		os.Remove(path)
		if _, err := VerifyFile(path); err == nil {
			t.Fatal("deleted log verified")
		}
	})
}

func TestAuditRefusesSymlink(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "target")
	os.WriteFile(target, nil, 0o600)
	link := filepath.Join(dir, "audit.log")
	os.Symlink(target, link)
	if _, err := OpenAudit(link); err == nil {
		t.Fatal("opened an audit log through a symlink")
	}
}

func TestStaleEpochRefused(t *testing.T) {
	dir := t.TempDir()
	audit, err := OpenAudit(filepath.Join(dir, "audit.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer audit.Close()
	cg := &fakeCG{quota: map[string]int64{"/a": -1}}
	ex := New(Actuators{CPU: cg}, audit, false, time.Now, "test")
	ex.SetEpoch(3)
	ex.SetEpoch(2) // never lowers
	r := ex.Apply(context.Background(), []Action{
		{VM: "a", Kind: KindCPUQuota, Group: cgroups.Group{CPU: "/a"}, Millicores: 300, Epoch: 2},
		{VM: "a", Kind: KindCPUQuota, Group: cgroups.Group{CPU: "/a"}, Millicores: 400, Epoch: 3},
	})
	if r[0].Outcome != Stale || r[0].Err == nil || r[1].Outcome != Applied {
		t.Fatalf("results %+v", r)
	}
	if cg.writes != 1 || cg.quota["/a"] != 40000 {
		t.Fatalf("stale action wrote: quota %d after %d writes", cg.quota["/a"], cg.writes)
	}
	recs := readAudit(t, filepath.Join(dir, "audit.log"))
	if len(recs) != 2 || recs[0].Result != "stale_epoch" || recs[0].Epoch != 2 || recs[1].Epoch != 3 {
		t.Fatalf("audit %+v", recs)
	}
	if _, err := VerifyFile(filepath.Join(dir, "audit.log")); err != nil {
		t.Fatal(err)
	}
}

func FuzzVerify(f *testing.F) {
	f.Add([]byte(`{"seq":1,"prev":"` + GenesisHash + `"}` + "\n"))
	f.Add([]byte("garbage"))
	f.Add([]byte("{}\n{}\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := Verify(bytes.NewReader(b))
		if err == nil && h.Seq > uint64(bytes.Count(b, []byte("\n"))) {
			t.Fatalf("head seq %d beyond %d lines", h.Seq, bytes.Count(b, []byte("\n")))
		}
	})
}

// TestAuditHeadMayLag: a crash after appending but before Sync leaves the
// head behind the log; that is not tampering, and the chain resumes.
func TestAuditHeadMayLag(t *testing.T) {
	path := writeLog(t, 3)
	l, err := OpenAudit(path)
	if err != nil {
		t.Fatal(err)
	}
	l.Append(Record{VM: "late"}) // no Sync: the "crash"
	l.f.Close()
	if h, err := VerifyFile(path); err != nil || h.Seq != 4 {
		t.Fatalf("lagging head: %+v %v", h, err)
	}
	l, err = OpenAudit(path)
	if err != nil || l.Rotated != "" {
		t.Fatalf("reopen after crash: %v rotated=%q", err, l.Rotated)
	}
	l.Append(Record{VM: "next"})
	l.Close()
	if h, err := VerifyFile(path); err != nil || h.Seq != 5 {
		t.Fatalf("after resume: %+v %v", h, err)
	}
}
