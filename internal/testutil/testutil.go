// Package testutil owns the helpers every test tier shares: the rule that
// privileged tests skip with a reason outside CI but fail under
// ARS_REQUIRE_PRIVILEGED=1, and locating the repository root.
package testutil

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"
)

// RequireEnv is the variable that turns skips of privileged tests into failures.
const RequireEnv = "ARS_REQUIRE_PRIVILEGED"

// Required reports whether privileged tests must run (CI).
func Required() bool { return os.Getenv(RequireEnv) == "1" }

// SkipOrFail skips the test with reason, or fails it when privileged tests
// are required.
func SkipOrFail(t testing.TB, reason string) {
	t.Helper()
	if Required() {
		t.Fatalf("%s=1 but the test cannot run: %s", RequireEnv, reason)
	}
	t.Skip(reason)
}

// RequirePrivileged skips (or fails under ARS_REQUIRE_PRIVILEGED=1) unless
// the test runs as root.
func RequirePrivileged(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		SkipOrFail(t, "needs root")
	}
}

// RequireBTF additionally requires kernel BTF for tp_btf programs.
func RequireBTF(t testing.TB) {
	t.Helper()
	RequirePrivileged(t)
	if _, err := os.Stat("/sys/kernel/btf/vmlinux"); err != nil {
		SkipOrFail(t, "kernel has no BTF at /sys/kernel/btf/vmlinux")
	}
}

// RequireCommand requires an executable on PATH.
func RequireCommand(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		SkipOrFail(t, name+" not installed (make deps installs it)")
	}
	return p
}

// RepoRoot returns the repository root (the directory holding go.mod).
func RepoRoot(t testing.TB) string {
	t.Helper()
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		t.Fatal("cannot locate testutil source")
	}
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

// Kernel returns the running kernel release, for skip messages.
func Kernel() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "unknown"
	}
	return unix.ByteSliceToString(u.Release[:])
}

// SharedData returns ../shared/data beside the repository root (the
// traces of ../shared/data/README.md). Without it the test skips, or fails
// under ARS_REQUIRE_PRIVILEGED=1 (CI always has it).
func SharedData(t testing.TB) string {
	t.Helper()
	d := filepath.Join(filepath.Dir(RepoRoot(t)), "shared", "data")
	if _, err := os.Stat(d); err != nil {
		SkipOrFail(t, fmt.Sprintf("shared traces not present at %s: %v", d, err))
	}
	return d
}
