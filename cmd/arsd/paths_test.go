package main

import (
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestCheckQMPDir(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	dir := t.TempDir()
	ok := filepath.Join(dir, "qmp")
	os.Mkdir(ok, 0o750)
	if err := checkQMPDir(ok, log); err != nil {
		t.Fatalf("0750 dir: %v", err)
	}
	open := filepath.Join(dir, "open")
	os.Mkdir(open, 0o700)
	os.Chmod(open, 0o777)
	if err := checkQMPDir(open, log); err == nil || !strings.Contains(err.Error(), "writable by anyone") {
		t.Fatalf("0777 dir: %v", err)
	}
	os.Chmod(open, 0o777|os.ModeSticky)
	if err := checkQMPDir(open, log); err == nil {
		t.Fatal("sticky world-writable dir accepted")
	}
	link := filepath.Join(dir, "link")
	os.Symlink(ok, link)
	if err := checkQMPDir(link, log); err == nil || !strings.Contains(err.Error(), "symbolic link") {
		t.Fatalf("symlink: %v", err)
	}
	file := filepath.Join(dir, "file")
	os.WriteFile(file, nil, 0o600)
	if err := checkQMPDir(file, log); err == nil {
		t.Fatal("file accepted")
	}
}
