package main

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ars-dev/ars/agent/executor"
)

// TestAuditVerifyDetectsTampering drives `arsctl audit verify` over a real
// log tampered with in each way the issue names, plus a control-API
// record: each must fail naming the first bad line.
func TestAuditVerifyDetectsTampering(t *testing.T) {
	write := func(t *testing.T) string {
		path := filepath.Join(t.TempDir(), "audit.log")
		l, err := executor.OpenAudit(path)
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 5; i++ {
			r := executor.Record{Time: time.Unix(int64(i), 0).UTC(), Actor: "arsd[1]", VM: "web", Kind: "cpu.quota",
				Before: "100", After: "200", Reason: "forecast", Epoch: 1, Result: "applied"}
			if i == 2 {
				r = executor.Record{Time: time.Unix(int64(i), 0).UTC(), Actor: "control uid=65534 gid=65534 pid=9",
					VM: "db", Kind: "control.denied", Target: "sla.set", Reason: "not owner", Result: "denied"}
			}
			if err := l.Append(r); err != nil {
				t.Fatal(err)
			}
		}
		if err := l.Sync(); err != nil {
			t.Fatal(err)
		}
		l.Close()
		return path
	}
	path := write(t)
	var out strings.Builder
	if err := run([]string{"audit", "verify", "--log", path}, &out); err != nil || !strings.Contains(out.String(), "intact, 5 records") {
		t.Fatalf("intact log: %v %s", err, out.String())
	}
	cases := map[string]struct {
		tamper func([][]byte) [][]byte
		line   string
	}{
		"edit":          {func(ls [][]byte) [][]byte { ls[2] = bytes.Replace(ls[2], []byte("65534"), []byte("0"), 1); return ls }, "line 4"},
		"delete":        {func(ls [][]byte) [][]byte { return append(ls[:1], ls[2:]...) }, "line 2"},
		"reorder":       {func(ls [][]byte) [][]byte { ls[1], ls[2] = ls[2], ls[1]; return ls }, "line 2"},
		"truncate tail": {func(ls [][]byte) [][]byte { return ls[:3] }, "head"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			path := write(t)
			b, _ := os.ReadFile(path)
			ls := bytes.SplitAfter(b, []byte("\n"))
			if len(ls[len(ls)-1]) == 0 {
				ls = ls[:len(ls)-1]
			}
			if err := os.WriteFile(path, bytes.Join(c.tamper(ls), nil), 0o600); err != nil {
				t.Fatal(err)
			}
			err := run([]string{"audit", "verify", "--log", path}, io.Discard)
			if err == nil {
				t.Fatal("tampered log verified")
			}
			if !strings.Contains(err.Error(), c.line) {
				t.Fatalf("error does not name %q: %v", c.line, err)
			}
		})
	}
}
