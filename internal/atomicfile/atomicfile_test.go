package atomicfile

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var errCrash = errors.New("crash")

// A crash at every step of a write leaves the old content or the new one,
// never a mix, and the next write succeeds.
func TestWriteFileCrashAtEveryStep(t *testing.T) {
	for _, at := range Steps {
		t.Run(string(at), func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "state")
			f := Format{Kind: "test", Version: 1}
			if err := f.Save(p, []byte("old"), Options{}); err != nil {
				t.Fatal(err)
			}
			err := f.Save(p, []byte("new"), Options{Fault: func(s Step) error {
				if s == at {
					return errCrash
				}
				return nil
			}})
			if !errors.Is(err, errCrash) {
				t.Fatalf("want the injected crash, got %v", err)
			}
			got, _, err := f.Load(p)
			if err != nil {
				t.Fatalf("after a crash at %s the file does not load: %v", at, err)
			}
			renamed := at == StepRenamed || at == StepDirSynced
			if want := map[bool]string{false: "old", true: "new"}[renamed]; string(got) != want {
				t.Fatalf("crash at %s: got %q, want %q", at, got, want)
			}
			if err := f.Save(p, []byte("next"), Options{}); err != nil {
				t.Fatal(err)
			}
			if got, _, _ := f.Load(p); string(got) != "next" {
				t.Fatalf("write after crash: %q", got)
			}
			fi, _ := os.Stat(p)
			if fi.Mode().Perm() != 0o600 {
				t.Fatalf("mode %v", fi.Mode())
			}
		})
	}
}

func TestCorruptAndTruncatedDetected(t *testing.T) {
	f := Format{Kind: "test", Version: 1}
	good := f.Encode([]byte("epoch: 7\nholder: a\n"))
	cases := map[string][]byte{
		"truncated":      good[:len(good)-3],
		"header only":    good[:bytes.IndexByte(good, '\n')],
		"flipped byte":   bytes.Replace(good, []byte("7"), []byte("8"), 1),
		"appended":       append(append([]byte{}, good...), 'x'),
		"empty":          {},
		"other kind":     Format{Kind: "other", Version: 1}.Encode([]byte("x")),
		"newer version":  Format{Kind: "test", Version: 2}.Encode([]byte("x")),
		"garbage header": []byte("#ars-state kind=test v=x\nabc"),
	}
	for name, b := range cases {
		p := filepath.Join(t.TempDir(), "s")
		os.WriteFile(p, b, 0o600)
		if _, _, err := f.Load(p); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: want ErrCorrupt, got %v", name, err)
		}
	}
	if _, _, err := f.Load(filepath.Join(t.TempDir(), "missing")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("missing: %v", err)
	}
}

func TestMigrationRewritesOlderFormat(t *testing.T) {
	p := filepath.Join(t.TempDir(), "s")
	// Version 0: a headerless legacy file.
	os.WriteFile(p, []byte("a: 1\n"), 0o644)
	f := Format{Kind: "test", Version: 2, Legacy: true, Migrate: map[int]Migration{
		0: func(b []byte) ([]byte, error) { return append(b, "b: 2\n"...), nil },
		1: func(b []byte) ([]byte, error) { return append(b, "c: 3\n"...), nil },
	}}
	got, from, err := f.Load(p)
	if err != nil || from != 0 || string(got) != "a: 1\nb: 2\nc: 3\n" {
		t.Fatalf("got %q from v%d, %v", got, from, err)
	}
	raw, _ := os.ReadFile(p)
	if !strings.HasPrefix(string(raw), "#ars-state kind=test v=2 ") {
		t.Fatalf("not rewritten in the current format:\n%s", raw)
	}
	if _, from, _ := f.Load(p); from != 2 {
		t.Fatalf("second load from v%d", from)
	}
	// Without Legacy a headerless file is corrupt.
	os.WriteFile(p, []byte("a: 1\n"), 0o600)
	if _, _, err := (Format{Kind: "test", Version: 1}).Load(p); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("headerless without Legacy: %v", err)
	}
}

func TestSymlinksRefused(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "target")
	os.WriteFile(target, []byte("secret"), 0o600)
	link := filepath.Join(dir, "link")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadFile(link, 100); err == nil {
		t.Fatal("read through a symlink")
	}
	if err := WriteFile(link, []byte("x"), Options{}); err == nil {
		t.Fatal("replaced a symlink")
	}
	if b, _ := os.ReadFile(target); string(b) != "secret" {
		t.Fatalf("target changed: %q", b)
	}
	if _, err := ReadFile(dir, 100); err == nil {
		t.Fatal("read a directory")
	}
	if _, err := ReadFile(target, 3); err == nil {
		t.Fatal("read past max")
	}
}
