// Package atomicfile owns how ARS keeps state files on disk: a file is
// replaced atomically (a temporary file in the same directory, fsync,
// rename over the old one, fsync of the directory), created 0600, never
// written or read through a symlink, and — for state files proper —
// wrapped in a one-line header carrying the kind, a format version, the
// payload's length and its SHA-256, so a truncated or corrupted file is
// detected on load and an older format is migrated to the current one.
//
// The header is a line starting with '#', so a YAML or text payload stays
// readable (and valid YAML) for an operator:
//
//	#ars-state kind=lease v=2 len=123 sha256=<hex>
//	<payload>
package atomicfile

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// ErrCorrupt is wrapped by every error about a file whose content cannot
// be trusted: a bad header, a wrong length (truncated or extended), a
// checksum mismatch, another kind, or a version newer than this build.
var ErrCorrupt = errors.New("corrupt state file")

// Step names a point inside WriteFile, for fault injection in tests.
type Step string

// The steps of an atomic write, in order.
const (
	StepTempCreated Step = "temp-created" // empty temp file exists
	StepTempWritten Step = "temp-written" // data written, not yet synced
	StepTempSynced  Step = "temp-synced"  // data durable in the temp file
	StepRenamed     Step = "renamed"      // temp renamed over path
	StepDirSynced   Step = "dir-synced"   // rename durable
)

// Steps lists the steps in the order they happen.
var Steps = []Step{StepTempCreated, StepTempWritten, StepTempSynced, StepRenamed, StepDirSynced}

// Options tune a write. The zero value is the production behaviour.
type Options struct {
	// Perm is the file mode (default 0600).
	Perm fs.FileMode
	// Fault, when not nil, is called after each step; a non-nil error
	// aborts the write there as a crash would (the temporary file is left
	// behind, as after a real crash). Tests only.
	Fault func(Step) error
}

// WriteFile replaces path with data atomically: a reader (or a crash)
// sees the old content or the new one, never a mix. A symlink at path is
// refused, never followed or replaced.
func WriteFile(path string, data []byte, o Options) error {
	perm := o.Perm
	if perm == 0 {
		perm = 0o600
	}
	fault := o.Fault
	if fault == nil {
		fault = func(Step) error { return nil }
	}
	if fi, err := os.Lstat(path); err == nil && fi.Mode()&fs.ModeSymlink != 0 {
		return fmt.Errorf("atomicfile: %s is a symlink; refusing to replace it", path)
	}
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("atomicfile: %w", err)
	}
	tmp := f.Name()
	crashed := false
	defer func() {
		if !crashed {
			os.Remove(tmp) // no-op after the rename
		}
	}()
	step := func(s Step) error {
		if err := fault(s); err != nil {
			crashed = true
			return fmt.Errorf("atomicfile: %s: injected fault at %s: %w", path, s, err)
		}
		return nil
	}
	fail := func(err error) error { f.Close(); return fmt.Errorf("atomicfile: %s: %w", path, err) }
	if err := f.Chmod(perm); err != nil {
		return fail(err)
	}
	if err := step(StepTempCreated); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(data); err != nil {
		return fail(err)
	}
	if err := step(StepTempWritten); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		return fail(err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("atomicfile: %s: %w", path, err)
	}
	if err := step(StepTempSynced); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("atomicfile: %w", err)
	}
	if err := step(StepRenamed); err != nil {
		return err
	}
	if err := SyncDir(dir); err != nil {
		return err
	}
	return step(StepDirSynced)
}

// SyncDir fsyncs a directory, making renames and creations in it durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("atomicfile: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("atomicfile: sync %s: %w", dir, err)
	}
	return nil
}

// ReadFile reads at most max bytes of the regular file at path without
// following a symlink in its last element (O_NOFOLLOW). A missing file is
// an error satisfying errors.Is(err, fs.ErrNotExist).
func ReadFile(path string, max int64) ([]byte, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		if errors.Is(err, unix.ELOOP) {
			return nil, fmt.Errorf("atomicfile: %s is a symlink; refusing to follow it", path)
		}
		return nil, &fs.PathError{Op: "open", Path: path, Err: err}
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("atomicfile: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("atomicfile: %s: not a regular file (mode %v); refusing it", path, fi.Mode().Type())
	}
	if fi.Size() > max {
		return nil, fmt.Errorf("atomicfile: %s: %d bytes, larger than %d", path, fi.Size(), max)
	}
	b, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, fmt.Errorf("atomicfile: %s: %w", path, err)
	}
	if int64(len(b)) > max {
		return nil, fmt.Errorf("atomicfile: %s: larger than %d bytes", path, max)
	}
	return b, nil
}

// Migration turns a payload of format version From into version From+1.
type Migration func(payload []byte) ([]byte, error)

// Format describes one kind of state file.
type Format struct {
	// Kind names the file's content ("lease", "epoch", "sla"); a file of
	// another kind is refused.
	Kind string
	// Version is the current format version (≥ 1).
	Version int
	// Migrate[v] upgrades a version-v payload to v+1. Loading a file of
	// version v < Version runs Migrate[v], Migrate[v+1], … in turn.
	Migrate map[int]Migration
	// Legacy, when true, accepts a file with no header as version 0 (a
	// file written before headers existed); Migrate[0] then upgrades it.
	Legacy bool
	// Max bounds the file's size (default 1 MiB).
	Max int64
}

const magic = "#ars-state "

func (f Format) max() int64 {
	if f.Max > 0 {
		return f.Max
	}
	return 1 << 20
}

// Encode returns the file bytes for payload at the current version.
func (f Format) Encode(payload []byte) []byte {
	sum := sha256.Sum256(payload)
	var b bytes.Buffer
	fmt.Fprintf(&b, "%skind=%s v=%d len=%d sha256=%s\n", magic, f.Kind, f.Version, len(payload), hex.EncodeToString(sum[:]))
	b.Write(payload)
	return b.Bytes()
}

// Decode checks b and returns its payload migrated to the current version,
// and the version the file was written in.
func (f Format) Decode(b []byte) (payload []byte, from int, err error) {
	if !bytes.HasPrefix(b, []byte(magic)) {
		if f.Legacy && !bytes.HasPrefix(b, []byte("#ars-state")) {
			return f.migrate(b, 0)
		}
		return nil, 0, fmt.Errorf("%w: no %q header", ErrCorrupt, strings.TrimSpace(magic))
	}
	nl := bytes.IndexByte(b, '\n')
	if nl < 0 {
		return nil, 0, fmt.Errorf("%w: header not terminated (truncated?)", ErrCorrupt)
	}
	fields := map[string]string{}
	for _, kv := range strings.Fields(string(b[len(magic):nl])) {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return nil, 0, fmt.Errorf("%w: bad header field %q", ErrCorrupt, kv)
		}
		fields[k] = v
	}
	if fields["kind"] != f.Kind {
		return nil, 0, fmt.Errorf("%w: kind %q, want %q", ErrCorrupt, fields["kind"], f.Kind)
	}
	v, err1 := strconv.Atoi(fields["v"])
	n, err2 := strconv.Atoi(fields["len"])
	if err1 != nil || err2 != nil || v < 0 || n < 0 {
		return nil, 0, fmt.Errorf("%w: bad version or length in header", ErrCorrupt)
	}
	if v > f.Version {
		return nil, v, fmt.Errorf("%w: format version %d is newer than this build's %d", ErrCorrupt, v, f.Version)
	}
	payload = b[nl+1:]
	if len(payload) != n {
		return nil, v, fmt.Errorf("%w: payload is %d bytes, header says %d (truncated or appended to)", ErrCorrupt, len(payload), n)
	}
	sum := sha256.Sum256(payload)
	if hex.EncodeToString(sum[:]) != fields["sha256"] {
		return nil, v, fmt.Errorf("%w: checksum mismatch", ErrCorrupt)
	}
	return f.migrate(payload, v)
}

func (f Format) migrate(payload []byte, from int) ([]byte, int, error) {
	for v := from; v < f.Version; v++ {
		m, ok := f.Migrate[v]
		if !ok {
			return nil, from, fmt.Errorf("%w: no migration from format version %d", ErrCorrupt, v)
		}
		var err error
		if payload, err = m(payload); err != nil {
			return nil, from, fmt.Errorf("%w: migrating version %d: %v", ErrCorrupt, v, err)
		}
	}
	return payload, from, nil
}

// Save writes payload to path atomically with the header.
func (f Format) Save(path string, payload []byte, o Options) error {
	return WriteFile(path, f.Encode(payload), o)
}

// Load reads path (no symlinks), checks it and returns the payload in the
// current format and the version it was stored in. If the file was older,
// it is rewritten in the current format (the migration is made durable).
// A missing file satisfies errors.Is(err, fs.ErrNotExist); an untrustworthy
// one errors.Is(err, ErrCorrupt).
func (f Format) Load(path string) ([]byte, int, error) {
	b, err := ReadFile(path, f.max())
	if err != nil {
		return nil, 0, err
	}
	payload, from, err := f.Decode(b)
	if err != nil {
		return nil, from, fmt.Errorf("atomicfile: %s: %w", path, err)
	}
	if from < f.Version {
		if err := f.Save(path, payload, Options{}); err != nil {
			return nil, from, fmt.Errorf("atomicfile: migrating %s: %w", path, err)
		}
	}
	return payload, from, nil
}
