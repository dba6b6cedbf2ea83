package ipc

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestDecodeRequestStrict(t *testing.T) {
	good := []string{
		`{"method":"status"}`,
		`{"method":"sla.get","params":{"vm":"web"}}`,
		`{"method":"vms","params":null}`,
		` {"method":"drm"} `,
	}
	for _, in := range good {
		if _, err := DecodeRequest([]byte(in)); err != nil {
			t.Errorf("%s: %v", in, err)
		}
	}
	bad := map[string]string{
		"unknown field":  `{"method":"status","extra":1}`,
		"trailing":       `{"method":"status"}{"method":"vms"}`,
		"not an object":  `["status"]`,
		"empty method":   `{"method":""}`,
		"odd method":     `{"method":"../x"}`,
		"params array":   `{"method":"vms","params":[1]}`,
		"params string":  `{"method":"vms","params":"x"}`,
		"garbage":        `not json`,
		"upper method":   `{"method":"STATUS"}`,
		"long method":    `{"method":"` + strings.Repeat("a", 65) + `"}`,
		"method as num":  `{"method":1}`,
		"too large":      `{"method":"vms","params":{"x":"` + strings.Repeat("a", MaxRequest) + `"}}`,
		"duplicate junk": `{"method":"vms",}`,
	}
	for name, in := range bad {
		if _, err := DecodeRequest([]byte(in)); err == nil {
			t.Errorf("%s: accepted %.80s", name, in)
		}
	}
	var p struct {
		VM string `json:"vm"`
	}
	if err := DecodeParams(json.RawMessage(`{"vm":"a","vn":"b"}`), &p); err == nil || !strings.Contains(err.Error(), "vn") {
		t.Errorf("unknown param: %v", err)
	}
	if err := DecodeParams(json.RawMessage(`{"vm":"a"} 1`), &p); err == nil {
		t.Error("trailing params accepted")
	}
	if err := DecodeParams(nil, &p); err != nil {
		t.Error(err)
	}
}

func TestServerRejectsMalformedRequests(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "ctl.sock")
	srv := NewServer(sock, func(Peer, string) error { return nil }, slog.New(slog.NewTextHandler(io.Discard, nil)))
	srv.Register("echo", func(_ context.Context, _ Peer, p json.RawMessage) (any, error) {
		var v struct {
			X int `json:"x"`
		}
		if err := DecodeParams(p, &v); err != nil {
			return nil, err
		}
		return v.X, nil
	})
	if err := srv.Listen(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { srv.Serve(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	var x int
	if err := Call(ctx, sock, "echo", map[string]int{"x": 3}, &x); err != nil || x != 3 {
		t.Fatalf("echo: %d %v", x, err)
	}
	if err := Call(ctx, sock, "echo", map[string]int{"y": 3}, &x); err == nil || !strings.Contains(err.Error(), `unknown field "y"`) {
		t.Fatalf("unknown param: %v", err)
	}
	if err := Call(ctx, sock, "Echo!", nil, nil); err == nil || !strings.Contains(err.Error(), "malformed request") {
		t.Fatalf("bad method: %v", err)
	}
}

func TestSocketModes(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	for _, shared := range []bool{false, true} {
		dir := filepath.Join(t.TempDir(), "run")
		sock := filepath.Join(dir, "arsd.sock")
		srv := NewServer(sock, RootOnly, log)
		srv.SetShared(shared)
		if err := srv.Listen(); err != nil {
			t.Fatal(err)
		}
		st, _ := os.Lstat(sock)
		dt, _ := os.Lstat(dir)
		wantSock, wantDir := os.FileMode(0o600), os.FileMode(0o700)
		if shared {
			wantSock, wantDir = 0o666, 0o711
		}
		if st.Mode().Perm() != wantSock || dt.Mode().Perm() != wantDir {
			t.Errorf("shared=%v: socket %04o dir %04o, want %04o %04o", shared, st.Mode().Perm(), dt.Mode().Perm(), wantSock, wantDir)
		}
		srv.ln.Close()
	}
	// A directory others can write is refused, and so is a symlinked one.
	dir := t.TempDir()
	open := filepath.Join(dir, "open")
	os.Mkdir(open, 0o700)
	os.Chmod(open, 0o777)
	if err := NewServer(filepath.Join(open, "s"), RootOnly, log).Listen(); err == nil || !strings.Contains(err.Error(), "writable") {
		t.Errorf("world-writable dir: %v", err)
	}
	real := filepath.Join(dir, "real")
	os.Mkdir(real, 0o700)
	link := filepath.Join(dir, "link")
	os.Symlink(real, link)
	if err := NewServer(filepath.Join(link, "s"), RootOnly, log).Listen(); err == nil || !strings.Contains(err.Error(), "not a directory") {
		t.Errorf("symlinked dir: %v", err)
	}
}

func TestConnectionLimitPerUID(t *testing.T) {
	s := NewServer("x", RootOnly, slog.New(slog.NewTextHandler(io.Discard, nil)))
	for i := 0; i < maxConnsPerUID; i++ {
		if !s.admit(1000) {
			t.Fatalf("connection %d refused", i)
		}
	}
	if s.admit(1000) {
		t.Fatal("connection over the limit admitted")
	}
	if !s.admit(1001) || !s.admit(0) {
		t.Fatal("other uid or root refused")
	}
	s.release(1000)
	if !s.admit(1000) {
		t.Fatal("released slot not reusable")
	}
}
