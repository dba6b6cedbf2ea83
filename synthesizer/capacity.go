package synthesizer

import "fmt"

// Quantity is a host's total of one resource and the part kept back for
// the host itself (kernel, QEMU's own overhead, arsd).
type Quantity struct {
	Total    int64 `yaml:"total"`
	Reserved int64 `yaml:"reserved"`
}

// Capacity is what one host can hand out, per resource, in the units of
// the SLA (millicores, MiB, IOPS, bytes/s, bits/s). A zero Total means the
// resource is not limited by the host (the Planner only clamps it to each
// VM's floor and ceiling). Per-disk and per-uplink capacities are not
// modelled yet: disk and network are one pool each.
type Capacity struct {
	CPU       Quantity `yaml:"cpuMillicores"`
	Memory    Quantity `yaml:"memoryMiB"`
	DiskIOPS  Quantity `yaml:"diskIOPS"`
	DiskBytes Quantity `yaml:"diskBytesPerSec"`
	Network   Quantity `yaml:"networkBitsPerSec"`
}

var capacityNames = [NumResources]string{"cpuMillicores", "memoryMiB", "diskIOPS", "diskBytesPerSec", "networkBitsPerSec"}

func (c *Capacity) q(r Resource) *Quantity {
	switch r {
	case CPU:
		return &c.CPU
	case Memory:
		return &c.Memory
	case DiskIOPS:
		return &c.DiskIOPS
	case DiskBytes:
		return &c.DiskBytes
	case Network:
		return &c.Network
	}
	return nil
}

// Set sets the total and reserved amounts of r.
func (c *Capacity) Set(r Resource, total, reserved int64) {
	if q := c.q(r); q != nil {
		*q = Quantity{Total: total, Reserved: reserved}
	}
}

// Allocatable is total − reserved (0 when the host does not limit r).
func (c Capacity) Allocatable(r Resource) int64 {
	q := c.q(r)
	if q == nil || q.Total <= 0 {
		return 0
	}
	return q.Total - q.Reserved
}

// Validate rejects negative amounts and reservations that leave nothing.
func (c Capacity) Validate() error {
	for r := CPU; r < NumResources; r++ {
		q := c.q(r)
		n := "capacity." + capacityNames[r]
		switch {
		case q.Total < 0:
			return fmt.Errorf("%s.total must be >= 0, got %d", n, q.Total)
		case q.Reserved < 0:
			return fmt.Errorf("%s.reserved must be >= 0, got %d", n, q.Reserved)
		case q.Total > 0 && q.Reserved >= q.Total:
			return fmt.Errorf("%s.reserved (%d) leaves nothing of total (%d)", n, q.Reserved, q.Total)
		case q.Total == 0 && q.Reserved > 0:
			return fmt.Errorf("%s.reserved is %d but total is 0 (unlimited)", n, q.Reserved)
		}
	}
	return nil
}
