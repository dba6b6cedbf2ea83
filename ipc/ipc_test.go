package ipc

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestFrameRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	for _, p := range [][]byte{{}, []byte("x"), bytes.Repeat([]byte("a"), 70000)} {
		if err := WriteFrame(&buf, p); err != nil {
			t.Fatal(err)
		}
	}
	for _, want := range []int{0, 1, 70000} {
		got, err := ReadFrame(&buf)
		if err != nil || len(got) != want {
			t.Fatalf("ReadFrame = %d bytes, %v; want %d", len(got), err, want)
		}
	}
	if _, err := ReadFrame(&buf); !errors.Is(err, io.EOF) {
		t.Fatalf("at end: %v, want EOF", err)
	}
}

func TestFrameErrors(t *testing.T) {
	var hdr [4]byte
	binary.BigEndian.PutUint32(hdr[:], MaxFrame+1)
	if _, err := ReadFrame(bytes.NewReader(hdr[:])); !errors.Is(err, ErrFrameTooLarge) {
		t.Errorf("oversized: %v", err)
	}
	binary.BigEndian.PutUint32(hdr[:], 10)
	if _, err := ReadFrame(bytes.NewReader(append(hdr[:], "abc"...))); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("truncated: %v", err)
	}
	if _, err := ReadFrame(bytes.NewReader([]byte{0, 0})); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("short header: %v", err)
	}
	if err := WriteFrame(io.Discard, make([]byte, MaxFrame+1)); !errors.Is(err, ErrFrameTooLarge) {
		t.Errorf("write oversized: %v", err)
	}
}

func FuzzReadFrame(f *testing.F) {
	f.Add([]byte{0, 0, 0, 2, 'h', 'i'})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Add([]byte{0, 0, 0, 5, 'x'})
	f.Fuzz(func(t *testing.T, b []byte) {
		r := bytes.NewReader(b)
		for {
			p, err := ReadFrame(r)
			if err != nil {
				return
			}
			if len(p) > MaxFrame {
				t.Fatalf("frame of %d bytes", len(p))
			}
		}
	})
}

func TestControlSocket(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "ctl", "arsd.sock")
	var seen Peer
	s := NewServer(path, func(p Peer, m string) error {
		if m == "secret" {
			return errors.New("no")
		}
		return nil
	}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	s.Register("echo", func(ctx context.Context, p Peer, params json.RawMessage) (any, error) {
		seen = p
		var v map[string]int
		if err := json.Unmarshal(params, &v); err != nil {
			return nil, err
		}
		v["n"]++
		return v, nil
	})
	s.Register("secret", func(context.Context, Peer, json.RawMessage) (any, error) { return "x", nil })
	if err := s.Listen(); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(filepath.Dir(path))
	if err != nil || st.Mode().Perm() != 0o700 {
		t.Fatalf("socket dir mode %v, %v", st.Mode(), err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- s.Serve(ctx) }()
	var out map[string]int
	if err := Call(ctx, path, "echo", map[string]int{"n": 41}, &out); err != nil || out["n"] != 42 {
		t.Fatalf("echo: %v %v", out, err)
	}
	if seen.PID != int32(os.Getpid()) || seen.UID != uint32(os.Getuid()) {
		t.Fatalf("peer %+v, want our pid/uid", seen)
	}
	if err := Call(ctx, path, "nope", nil, nil); err == nil || !strings.Contains(err.Error(), "unknown method") {
		t.Fatalf("unknown method: %v", err)
	}
	if err := Call(ctx, path, "secret", nil, nil); err == nil || !strings.Contains(err.Error(), "permission denied") {
		t.Fatalf("denied: %v", err)
	}
	// A second server on the same live socket must refuse.
	if err := NewServer(path, RootOnly, slog.Default()).Listen(); err == nil {
		t.Fatal("second Listen on a live socket succeeded")
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("socket left behind: %v", err)
	}
}

func TestListenRefusesNonSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f")
	os.WriteFile(path, []byte("keep me"), 0o600)
	if err := NewServer(path, RootOnly, slog.Default()).Listen(); err == nil {
		t.Fatal("Listen replaced a regular file")
	}
	if b, _ := os.ReadFile(path); string(b) != "keep me" {
		t.Fatal("file was touched")
	}
}
