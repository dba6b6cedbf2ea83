//go:build linux

package telemetry

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/ars-dev/ars/internal/testutil"
)

// TestFaultsMatchProcStat tracks a helper process, makes it fault 8192
// fresh pages, and checks the eBPF fault count (page_fault_user +
// page_fault_kernel) against the kernel's minflt+majflt of the process
// over the same window. Tolerance: within max(2%, 16) — an exception that
// ends in an error (or a spurious one) is counted by eBPF and not by the
// kernel, and a get_user_pages fault the other way round. Measured: exact.
func TestFaultsMatchProcStat(t *testing.T) {
	testutil.RequireBTF(t)
	f, err := LoadFaults()
	if err != nil {
		t.Fatalf("LoadFaults: %+v", err)
	}
	t.Cleanup(func() {
		if err := f.Close(); err != nil {
			t.Error(err)
		}
	})
	h := startHelper(t)
	pid := uint32(h.pid())
	if err := f.TrackProcess(pid, 3); err != nil {
		t.Fatal(err)
	}
	read := func() (bpf, kernel uint64) {
		got, err := f.Read()
		if err != nil {
			t.Fatal(err)
		}
		minor, major, err := ReadProcFaults("/proc", int(pid))
		if err != nil {
			t.Fatal(err)
		}
		return got[pid].User + got[pid].Kernel, minor + major
	}
	b0, k0 := read()
	const pages = 8192
	h.do(t, "touch "+strconv.Itoa(pages))
	b1, k1 := read()
	bpf, kernel := b1-b0, k1-k0
	t.Logf("faults over the window: eBPF %d, /proc/%d/stat minflt+majflt %d (%d pages touched)", bpf, pid, kernel, pages)
	if kernel < pages {
		t.Fatalf("kernel counted %d faults for %d fresh pages", kernel, pages)
	}
	if tol := (Tolerance{Rel: 0.02, Abs: 16}); !tol.Allows(bpf, kernel, 0) {
		t.Errorf("eBPF faults %d vs kernel %d: outside %v", bpf, kernel, tol)
	}
	if e, err := f.Errors(); err != nil || e != 0 {
		t.Errorf("in-kernel errors %d (%v)", e, err)
	}
	// Untracked: nothing counted.
	if err := f.UntrackProcess(pid); err != nil {
		t.Fatal(err)
	}
	h.do(t, "touch 256")
	if got, _ := f.Read(); len(got) != 0 {
		t.Errorf("after UntrackProcess: %v", got)
	}
}

// TestBlockIOMatchesDiskstat creates a loop device, has a tracked helper
// process do O_DIRECT 4 KiB writes then reads on it, and checks the eBPF
// requests and bytes by direction against the device's
// /sys/block/loopN/stat over the same window. Tolerance: eBPF may count at
// most 2 requests (and their bytes) fewer than the device per direction
// (udev may probe a new device; such I/O is not the helper's) and never
// more. Measured: exact.
func TestBlockIOMatchesDiskstat(t *testing.T) {
	testutil.RequireBTF(t)
	losetup := testutil.RequireCommand(t, "losetup")
	b, err := LoadBlockIO()
	if err != nil {
		t.Fatalf("LoadBlockIO: %+v", err)
	}
	t.Cleanup(func() {
		if err := b.Close(); err != nil {
			t.Error(err)
		}
	})
	dev := newLoopDevice(t, losetup, 16<<20)
	h := startHelper(t)
	pid := uint32(h.pid())
	if err := b.TrackProcess(pid, 5); err != nil {
		t.Fatal(err)
	}
	const writes, reads = 300, 200
	h.do(t, "io "+dev+" 1 1") // warm up: device opened once, udev's probe has started
	s0, b0 := diskstat(t, dev), readIO(t, b, pid)
	h.do(t, "io "+dev+" "+strconv.Itoa(writes)+" "+strconv.Itoa(reads))
	s1, b1 := diskstat(t, dev), readIO(t, b, pid)
	io := b1.Sub(b0)
	for _, c := range []struct {
		name      string
		bpf, disk uint64
	}{
		{"write requests", io.Requests[IOWrite], s1[4] - s0[4]},
		{"write bytes", io.Bytes[IOWrite], (s1[6] - s0[6]) * 512},
		{"read requests", io.Requests[IORead], s1[0] - s0[0]},
		{"read bytes", io.Bytes[IORead], (s1[2] - s0[2]) * 512},
	} {
		t.Logf("%s: eBPF %d, %s stat %d", c.name, c.bpf, filepath.Base(dev), c.disk)
		slack := uint64(2)
		if strings.HasSuffix(c.name, "bytes") {
			slack *= 4096
		}
		if c.bpf > c.disk || c.bpf+slack < c.disk {
			t.Errorf("%s: eBPF %d vs device %d (want device-%d <= eBPF <= device)", c.name, c.bpf, c.disk, slack)
		}
	}
	if io.Requests[IOWrite] < writes || io.Requests[IORead] < reads {
		t.Errorf("eBPF saw %d writes, %d reads; the helper did %d, %d", io.Requests[IOWrite], io.Requests[IORead], writes, reads)
	}
	for d, name := range []string{"read", "write"} {
		var n uint64
		for _, c := range io.Hist[d] {
			n += c
		}
		if n != io.Requests[d] || io.LatencyNs[d] == 0 {
			t.Errorf("%s: histogram holds %d of %d requests, latency sum %d ns", name, n, io.Requests[d], io.LatencyNs[d])
		}
		if io.Requests[d] > 0 {
			t.Logf("%s: mean issue->complete latency %.1f µs", name, float64(io.LatencyNs[d])/float64(io.Requests[d])/1e3)
		}
	}
	if e, err := b.Errors(); err != nil || e != (BlockIOErrors{}) {
		t.Errorf("in-kernel errors %+v (%v)", e, err)
	}
}

func readIO(t *testing.T, b *BlockIO, pid uint32) IOStats {
	t.Helper()
	got, err := b.Read()
	if err != nil {
		t.Fatal(err)
	}
	s, ok := got[pid]
	if !ok {
		t.Fatalf("tracked %d missing from Read: %v", pid, got)
	}
	return s
}

// newLoopDevice attaches a sparse file of size bytes to a free loop device,
// detached at cleanup.
func newLoopDevice(t *testing.T, losetup string, size int64) string {
	t.Helper()
	img := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, size); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(losetup, "--find", "--show", img).CombinedOutput()
	if err != nil {
		testutil.SkipOrFail(t, "losetup: "+strings.TrimSpace(string(out))+": "+err.Error())
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() {
		if out, err := exec.Command(losetup, "--detach", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup --detach %s: %v: %s", dev, err, out)
		}
	})
	return dev
}

// diskstat is /sys/block/<dev>/stat's fields.
func diskstat(t *testing.T, dev string) []uint64 {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "stat"))
	if err != nil {
		t.Fatal(err)
	}
	var out []uint64
	for _, f := range strings.Fields(string(b)) {
		n, err := strconv.ParseUint(f, 10, 64)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, n)
	}
	if len(out) < 11 {
		t.Fatalf("%s stat: %d fields", dev, len(out))
	}
	return out
}
