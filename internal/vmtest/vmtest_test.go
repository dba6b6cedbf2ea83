package vmtest

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/ars-dev/ars/internal/vm"
)

func TestCheckGuestHint(t *testing.T) {
	err := checkGuest(t.TempDir())
	if err == nil || !strings.Contains(err.Error(), "run make guest") {
		t.Fatalf("missing guest: %v", err)
	}
}

// TestStart boots a guest for one subtest and checks that the subtest's
// cleanup stopped QEMU and removed its cgroup.
func TestStart(t *testing.T) {
	var v *vm.VM
	var dirs []string
	t.Run("boot", func(t *testing.T) {
		v = Start(t, vm.Config{Name: "vmtest-start", MemMiB: 128})
		for _, d := range v.Cgroup.Dirs {
			dirs = append(dirs, d)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		st, err := v.Status(ctx)
		if err != nil || st.CPUs != 1 {
			t.Fatalf("status %+v, %v", st, err)
		}
	})
	if v == nil {
		return // skipped
	}
	select {
	case <-v.Exited():
	default:
		t.Errorf("QEMU pid %d still running after the subtest's cleanup", v.PID)
	}
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", v.PID)); err == nil && strings.Contains(string(b), v.QMPPath) {
		t.Errorf("QEMU pid %d still exists", v.PID)
	}
	for _, d := range dirs {
		if _, err := os.Stat(d); err == nil {
			t.Errorf("cgroup %s left behind", d)
		}
	}
}
