// Package vmtest owns the test glue around internal/vm: booting a guest
// for one test (Start) or once for a whole test binary (Shared), with the
// privilege check, the "run make guest" hint, temporary work directories,
// the ready wait and guaranteed cleanup.
package vmtest

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/ars-dev/ars/internal/testutil"
	"github.com/ars-dev/ars/internal/vm"
)

// ReadyTimeout bounds the wait for the guest's ready line (boot is ~10-20 s
// under TCG; a loaded CI host can double it).
const ReadyTimeout = 90 * time.Second

// GuestDir returns the built guest directory, failing the test with a hint
// when the images are missing. $ARS_GUEST_DIR overrides the default
// <repo>/build/guest.
func GuestDir(t testing.TB) string {
	t.Helper()
	dir := os.Getenv("ARS_GUEST_DIR")
	if dir == "" {
		dir = filepath.Join(testutil.RepoRoot(t), "build", "guest")
	}
	if err := checkGuest(dir); err != nil {
		t.Fatal(err)
	}
	return dir
}

func checkGuest(dir string) error {
	for _, f := range []string{"vmlinuz", "initramfs.gz"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			return fmt.Errorf("test guest missing (%v): run make guest", err)
		}
	}
	return nil
}

// Start boots a guest for one test and waits until it is ready. It skips
// (or fails under ARS_REQUIRE_PRIVILEGED=1) without root. Empty Dir, Kernel
// and Initrd are filled in; Close is registered with t.Cleanup.
func Start(t testing.TB, cfg vm.Config) *vm.VM {
	t.Helper()
	testutil.RequirePrivileged(t)
	testutil.RequireCommand(t, "qemu-system-x86_64")
	gd := GuestDir(t)
	fill(&cfg, gd, "")
	if cfg.Dir == "" {
		cfg.Dir = workDir(t)
	}
	ctx, cancel := context.WithTimeout(context.Background(), ReadyTimeout)
	defer cancel()
	v, err := vm.Start(ctx, nil, cfg)
	if err != nil {
		t.Fatalf("start guest: %v", err)
	}
	t.Cleanup(func() {
		if err := v.Close(); err != nil {
			t.Errorf("close guest %s: %v", v.Name, err)
		}
	})
	if err := v.WaitReady(ctx); err != nil {
		t.Fatalf("guest %s: %v", v.Name, err)
	}
	t.Logf("guest %s ready in %s (pid %d)", v.Name, v.BootTime().Round(time.Millisecond), v.PID)
	return v
}

func fill(cfg *vm.Config, guestDir, name string) {
	if cfg.Kernel == "" {
		cfg.Kernel = filepath.Join(guestDir, "vmlinuz")
	}
	if cfg.Initrd == "" {
		cfg.Initrd = filepath.Join(guestDir, "initramfs.gz")
	}
	if cfg.Name == "" {
		cfg.Name = name
	}
	if cfg.Name == "" {
		cfg.Name = "test"
	}
}

// workDir is t.TempDir unless its path is too long for the unix sockets
// inside it; then a short directory under os.TempDir, removed at cleanup.
func workDir(t testing.TB) string {
	d := t.TempDir()
	if len(d) < 80 {
		return d
	}
	d, err := os.MkdirTemp("", "ars-vm-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// Shared is one guest booted lazily by the first test that asks for it and
// closed when the test binary ends. Use it from TestMain:
//
//	var guest = vmtest.NewShared(vm.Config{Name: "shared", VCPUs: 1, MemMiB: 192})
//	func TestMain(m *testing.M) { os.Exit(guest.Run(m)) }
//	func TestX(t *testing.T) { v := guest.Get(t); ... }
//
// Tests share its state (load set-point, hot-added CPUs); each test should
// leave the load at zero. If the boot fails, every test that asks fails
// with the same error.
type Shared struct {
	cfg vm.Config

	once sync.Once
	vm   *vm.VM
	dir  string
	err  error
}

// NewShared prepares (but does not boot) a shared guest.
func NewShared(cfg vm.Config) *Shared { return &Shared{cfg: cfg} }

// Get returns the shared guest, booting it on first use. It skips (or
// fails) like Start without root.
func (s *Shared) Get(t testing.TB) *vm.VM {
	t.Helper()
	testutil.RequirePrivileged(t)
	testutil.RequireCommand(t, "qemu-system-x86_64")
	gd := GuestDir(t)
	s.once.Do(func() { s.boot(gd) })
	if s.err != nil {
		t.Fatalf("shared guest: %v", s.err)
	}
	return s.vm
}

func (s *Shared) boot(guestDir string) {
	cfg := s.cfg
	fill(&cfg, guestDir, "shared")
	if cfg.Dir == "" {
		d, err := os.MkdirTemp("", "ars-vm-")
		if err != nil {
			s.err = err
			return
		}
		s.dir, cfg.Dir = d, d
	}
	ctx, cancel := context.WithTimeout(context.Background(), ReadyTimeout)
	defer cancel()
	v, err := vm.Start(ctx, nil, cfg)
	if err != nil {
		s.err = err
		return
	}
	s.vm = v
	if err := v.WaitReady(ctx); err != nil {
		s.err = err
		return
	}
	fmt.Fprintf(os.Stderr, "vmtest: shared guest %s ready in %s (pid %d)\n", v.Name, v.BootTime().Round(time.Millisecond), v.PID)
}

// VM returns the guest if it was booted, else nil (for TestMain-level checks).
func (s *Shared) VM() *vm.VM { return s.vm }

// Close stops the shared guest and removes its work directory.
func (s *Shared) Close() error {
	var err error
	if s.vm != nil {
		err = s.vm.Close()
	}
	if s.dir != "" {
		os.RemoveAll(s.dir)
	}
	return err
}

// Run runs the tests, then closes the guest. A failing Close turns a pass
// into a failure: tests must not leave anything behind.
func (s *Shared) Run(m *testing.M) int {
	code := m.Run()
	if err := s.Close(); err != nil {
		fmt.Fprintf(os.Stderr, "vmtest: closing shared guest: %v\n", err)
		if code == 0 {
			code = 1
		}
	}
	return code
}
