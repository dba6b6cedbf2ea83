package executor

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestAuditAnchorCatchesRewrittenTail: cutting the last lines of the log
// and rewriting its head file to match passes VerifyFile (the log is
// consistent with itself), but not the anchor kept in the journal.
func TestAuditAnchorCatchesRewrittenTail(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := OpenAudit(path)
	if err != nil {
		t.Fatal(err)
	}
	var anchor Head
	l.OnSync = func(h Head) error { anchor = h; return nil }
	for i := 0; i < 5; i++ {
		if err := l.Append(Record{Time: time.Unix(int64(i), 0), Actor: "t", Kind: "cpu.quota", Result: "applied"}); err != nil {
			t.Fatal(err)
		}
		if err := l.Sync(); err != nil {
			t.Fatal(err)
		}
	}
	l.Close()
	if anchor.Seq != 5 {
		t.Fatalf("OnSync saw %+v, want seq 5", anchor)
	}
	// The untouched log opens against its anchor and continues.
	l, err = OpenAuditAnchored(path, &anchor)
	if err != nil || l.Rotated != "" {
		t.Fatalf("intact log: %v, rotated %q", err, l.Rotated)
	}
	l.Close()

	// Cut two lines and rewrite the head to the new last line.
	b, _ := os.ReadFile(path)
	lines := strings.SplitAfter(strings.TrimSuffix(string(b), "\n"), "\n")
	kept := strings.Join(lines[:3], "")
	if !strings.HasSuffix(kept, "\n") {
		kept += "\n"
	}
	os.WriteFile(path, []byte(kept), 0o600)
	h, err := Verify(strings.NewReader(kept))
	if err != nil {
		t.Fatal(err)
	}
	hb, _ := json.Marshal(h)
	os.WriteFile(path+".head", append(hb, '\n'), 0o600)
	if _, err := VerifyFile(path); err != nil {
		t.Fatalf("the rewritten log should verify on its own (that is the attack): %v", err)
	}
	l, err = OpenAuditAnchored(path, &anchor)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if l.Rotated == "" {
		t.Fatal("log with its tail cut and head rewritten was extended, not moved aside")
	}
	moved, err := os.ReadFile(l.Rotated)
	if err != nil || string(moved) != kept {
		t.Fatalf("moved-aside log changed: %v", err)
	}
	nb, _ := os.ReadFile(path)
	if !strings.Contains(string(nb), "journal's anchor") {
		t.Fatalf("new chain's first record does not say why:\n%s", nb)
	}
}
