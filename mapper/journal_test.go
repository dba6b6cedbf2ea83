package mapper

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestJournalIntentOutcomePending(t *testing.T) {
	path := filepath.Join(t.TempDir(), "drm.db")
	j, err := OpenJournal(path)
	if err != nil {
		t.Fatal(err)
	}
	s1, err := j.Intent(Entry{VM: "a", Kind: "cpu.quota", Value: "20000", Epoch: 1})
	if err != nil {
		t.Fatal(err)
	}
	s2, _ := j.Intent(Entry{VM: "b", Kind: "mem.balloon", Value: "1", Epoch: 1})
	if s1 != 1 || s2 != 2 {
		t.Fatalf("seqs %d %d", s1, s2)
	}
	if err := j.Outcome(s1, "applied", "", time.Unix(5, 0)); err != nil {
		t.Fatal(err)
	}
	if err := j.Outcome(99, "applied", "", time.Now()); !errors.Is(err, ErrNoEntry) {
		t.Fatalf("unknown seq: %v", err)
	}
	j.Close() // a "crash" after the second intent
	j, err = OpenJournal(path)
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	p, err := j.Pending()
	if err != nil || len(p) != 1 || p[0].Seq != 2 || p[0].VM != "b" {
		t.Fatalf("pending after reopen: %+v %v", p, err)
	}
	if s3, _ := j.Intent(Entry{VM: "c"}); s3 != 3 {
		t.Fatalf("sequence did not survive reopen: %d", s3)
	}
	if st, _ := os.Stat(path); st.Mode().Perm() != 0o600 {
		t.Fatalf("journal mode %v", st.Mode())
	}
}

func TestJournalRefusesSymlink(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "real"), nil, 0o600)
	os.Symlink(filepath.Join(dir, "real"), filepath.Join(dir, "drm.db"))
	if _, err := OpenJournal(filepath.Join(dir, "drm.db")); err == nil {
		t.Fatal("opened a journal through a symlink")
	}
}

func BenchmarkJournalIntentOutcome(b *testing.B) {
	j, err := OpenJournal(filepath.Join(b.TempDir(), "drm.db"))
	if err != nil {
		b.Fatal(err)
	}
	defer j.Close()
	for i := 0; i < b.N; i++ {
		s, err := j.Intent(Entry{VM: "a", Kind: "cpu.quota", Value: "1"})
		if err != nil {
			b.Fatal(err)
		}
		if err := j.Outcome(s, "applied", "", time.Now()); err != nil {
			b.Fatal(err)
		}
	}
}

func TestJournalAuditHead(t *testing.T) {
	path := filepath.Join(t.TempDir(), "drm.db")
	j, err := OpenJournal(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok, err := j.AuditHead(); ok || err != nil {
		t.Fatalf("fresh journal has an audit head: %v %v", ok, err)
	}
	if err := j.SetAuditHead(AuditHead{Seq: 7, Hash: "ab"}); err != nil {
		t.Fatal(err)
	}
	j.Close()
	j, err = OpenJournal(path)
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	if h, ok, err := j.AuditHead(); !ok || err != nil || h != (AuditHead{Seq: 7, Hash: "ab"}) {
		t.Fatalf("audit head after reopen: %+v %v %v", h, ok, err)
	}
}
