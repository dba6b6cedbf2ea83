package agent

import (
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/ars-dev/ars/synthesizer"
)

func TestHostCapacityDefaultsFromHost(t *testing.T) {
	dir := t.TempDir()
	mi := filepath.Join(dir, "meminfo")
	os.WriteFile(mi, []byte("MemTotal:        4096000 kB\nMemFree:  1 kB\n"), 0o600)
	c, err := HostCapacity(synthesizer.Capacity{}, mi)
	if err != nil {
		t.Fatal(err)
	}
	if want := int64(runtime.NumCPU()) * 1000; c.CPU.Total != want || c.CPU.Reserved != max(want/20, 100) {
		t.Fatalf("cpu %+v, want total %d", c.CPU, want)
	}
	if c.Memory.Total != 4000 || c.Memory.Reserved != 400 {
		t.Fatalf("memory %+v, want 4000 MiB total, 400 reserved", c.Memory)
	}
	// A configured total is kept with its reservation.
	c, err = HostCapacity(synthesizer.Capacity{CPU: synthesizer.Quantity{Total: 900}}, mi)
	if err != nil || c.CPU.Total != 900 || c.CPU.Reserved != 0 {
		t.Fatalf("configured cpu %+v %v", c.CPU, err)
	}
	// The real host's meminfo parses.
	if c, err := HostCapacity(synthesizer.Capacity{}, "/proc/meminfo"); err != nil || c.Memory.Total <= 0 {
		t.Fatalf("host: %+v %v", c.Memory, err)
	}
	os.WriteFile(mi, []byte("MemFree: 1 kB\n"), 0o600)
	if _, err := HostCapacity(synthesizer.Capacity{}, mi); err == nil {
		t.Fatal("meminfo without MemTotal accepted")
	}
}
