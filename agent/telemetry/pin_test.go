//go:build linux

package telemetry

import (
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ars-dev/ars/internal/testutil"
)

// tempBPFFS mounts a private bpffs for the test and unmounts it (with
// everything pinned there) at cleanup.
func tempBPFFS(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		t.Fatalf("mount bpffs: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	return dir
}

// TestPinnedTelemetrySurvivesReload: a second load re-uses the first's
// pinned maps and links: the tracked thread and its counters carry over,
// and the program kept counting while nothing held it.
func TestPinnedTelemetrySurvivesReload(t *testing.T) {
	testutil.RequireBTF(t)
	runtime.LockOSThread() // the tracked thread is this one
	defer runtime.UnlockOSThread()
	root := filepath.Join(tempBPFFS(t), "ars")
	r1, err := LoadRunqlatPinned(root)
	if err != nil {
		t.Fatalf("%+v", err)
	}
	if err := r1.SetSpikeThreshold(5 * time.Millisecond); err != nil {
		t.Fatalf("globals of a pinned object: %v", err)
	}
	tid := uint32(unix.Gettid())
	if err := r1.Track(tid, 3, 0); err != nil {
		t.Fatal(err)
	}
	busy(50 * time.Millisecond)
	before, err := r1.Read()
	if err != nil {
		t.Fatal(err)
	}
	if err := r1.Close(); err != nil {
		t.Fatal(err)
	}
	// No agent now: the pinned link keeps the program attached.
	busy(100 * time.Millisecond)
	r2, err := LoadRunqlatPinned(root)
	if err != nil {
		t.Fatalf("%+v", err)
	}
	t.Cleanup(func() { r2.Close() })
	if err := r2.SetSpikeThreshold(7 * time.Millisecond); err != nil {
		t.Fatalf("globals of a re-used pinned object: %v", err)
	}
	after, err := r2.Read()
	if err != nil {
		t.Fatal(err)
	}
	b, a := before[tid], after[tid]
	t.Logf("before reload: %d ns on CPU; after: %d ns", b.OnCPUNs, a.OnCPUNs)
	if _, ok := after[tid]; !ok {
		t.Fatalf("tracked thread lost across reload: %v", after)
	}
	if a.OnCPUNs <= b.OnCPUNs {
		t.Fatalf("counters did not carry over and grow: before %+v after %+v", b, a)
	}
	ents, _ := os.ReadDir(root)
	if len(ents) != 1 {
		t.Fatalf("pin root holds %d entries, want one probe directory", len(ents))
	}
	links, _ := filepath.Glob(filepath.Join(root, ents[0].Name(), "link_*"))
	if len(links) != 3 {
		t.Fatalf("pinned links %v", links)
	}
	if err := Unpin(root); err != nil {
		t.Fatal(err)
	}
}

// busy spins the calling thread for d, with a few sleeps so it switches.
func busy(d time.Duration) {
	end := time.Now().Add(d)
	for time.Now().Before(end) {
		for i := 0; i < 1e5; i++ {
		}
		time.Sleep(time.Millisecond)
	}
}
