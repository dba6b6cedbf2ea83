package synthesizer

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"regexp"
	"sort"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// Resource is one kind of resource the Planner allocates.
type Resource uint8

// The resources, in the order plans list them.
const (
	CPU       Resource = iota // millicores
	Memory                    // MiB
	DiskIOPS                  // I/O operations per second
	DiskBytes                 // bytes per second
	Network                   // bits per second
	NumResources
)

var resourceNames = [NumResources]string{"cpu", "memory", "disk_iops", "disk_bps", "network"}

// String is the resource's name in plans, metrics and audit records.
func (r Resource) String() string {
	if r < NumResources {
		return resourceNames[r]
	}
	return fmt.Sprintf("resource(%d)", uint8(r))
}

// ParseResourceName is the inverse of String.
func ParseResourceName(s string) (Resource, error) {
	for i, n := range resourceNames {
		if n == s {
			return Resource(i), nil
		}
	}
	return 0, fmt.Errorf("unknown resource %q (known: %s)", s, strings.Join(resourceNames[:], ", "))
}

// MemorySLA bounds memory, in MiB.
type MemorySLA struct {
	FloorMiB   int64 `yaml:"floorMiB"`
	CeilingMiB int64 `yaml:"ceilingMiB"`
}

// DiskSLA bounds block I/O, in operations and bytes per second.
type DiskSLA struct {
	FloorIOPS          int64 `yaml:"floorIOPS"`
	CeilingIOPS        int64 `yaml:"ceilingIOPS"`
	FloorBytesPerSec   int64 `yaml:"floorBytesPerSec"`
	CeilingBytesPerSec int64 `yaml:"ceilingBytesPerSec"`
}

// NetworkSLA bounds the VM's egress rate, in bits per second.
type NetworkSLA struct {
	FloorBitsPerSec   int64 `yaml:"floorBitsPerSec"`
	CeilingBitsPerSec int64 `yaml:"ceilingBitsPerSec"`
}

// Class is a priority class.
type Class string

// The classes, from most to least important.
const (
	Critical   Class = "critical"
	Standard   Class = "standard"
	BestEffort Class = "best-effort"
)

// Classes lists the classes from most to least important.
func Classes() []Class { return []Class{Critical, Standard, BestEffort} }

// Rank is 2 for critical, 1 for standard (and ""), 0 for best-effort,
// -1 for an unknown class.
func (c Class) Rank() int {
	switch c {
	case Critical:
		return 2
	case Standard, "":
		return 1
	case BestEffort:
		return 0
	}
	return -1
}

// Norm returns the class with "" spelled standard.
func (c Class) Norm() Class {
	if c == "" {
		return Standard
	}
	return c
}

// MaxPriority bounds SLA.Priority.
const MaxPriority = 999

// Rank orders VMs: class first, then Priority inside the class; higher
// wins.
func (s SLA) Rank() int { return s.Class.Rank()*(MaxPriority+1) + s.Priority }

// Bounds returns the floor and ceiling of resource r; managed is false for
// a resource the SLA leaves alone (ceiling 0, every resource but CPU).
func (s SLA) Bounds(r Resource) (floor, ceiling int64, managed bool) {
	switch r {
	case CPU:
		return s.CPU.FloorMillicores, s.CPU.CeilingMillicores, true
	case Memory:
		floor, ceiling = s.Memory.FloorMiB, s.Memory.CeilingMiB
	case DiskIOPS:
		floor, ceiling = s.Disk.FloorIOPS, s.Disk.CeilingIOPS
	case DiskBytes:
		floor, ceiling = s.Disk.FloorBytesPerSec, s.Disk.CeilingBytesPerSec
	case Network:
		floor, ceiling = s.Network.FloorBitsPerSec, s.Network.CeilingBitsPerSec
	}
	return floor, ceiling, ceiling > 0
}

// fieldNames are the YAML paths of each resource's floor and ceiling, for
// messages.
var fieldNames = [NumResources][2]string{
	{"cpu.floorMillicores", "cpu.ceilingMillicores"},
	{"memory.floorMiB", "memory.ceilingMiB"},
	{"disk.floorIOPS", "disk.ceilingIOPS"},
	{"disk.floorBytesPerSec", "disk.ceilingBytesPerSec"},
	{"network.floorBitsPerSec", "network.ceilingBitsPerSec"},
}

// maxBound caps ceilings at values no host reaches (catches wrong units).
var maxBound = [NumResources]int64{1_000_000, 64 << 20, 100_000_000, 1 << 40, 1 << 42}

func (s SLA) validateRest() error {
	for r := Memory; r < NumResources; r++ {
		f, c, _ := s.Bounds(r)
		fn := fieldNames[r]
		switch {
		case f < 0:
			return fmt.Errorf("%s must be >= 0, got %d", fn[0], f)
		case c < 0:
			return fmt.Errorf("%s must be >= 0, got %d", fn[1], c)
		case c == 0 && f > 0:
			return fmt.Errorf("%s is %d but %s is 0 (unmanaged); set a ceiling", fn[0], f, fn[1])
		case c > 0 && c < f:
			return fmt.Errorf("%s (%d) is below %s (%d)", fn[1], c, fn[0], f)
		case c > maxBound[r]:
			return fmt.Errorf("%s %d is beyond any host (max %d); check the unit", fn[1], c, maxBound[r])
		}
	}
	if s.Class.Rank() < 0 {
		return fmt.Errorf("class: unknown priority class %q (want critical, standard or best-effort)", s.Class)
	}
	if s.Priority < 0 || s.Priority > MaxPriority {
		return fmt.Errorf("priority must be in [0, %d], got %d", MaxPriority, s.Priority)
	}
	if !(s.TargetViolation >= 0 && s.TargetViolation < 0.5) {
		return fmt.Errorf("targetViolation must be in [0, 0.5), got %v", s.TargetViolation)
	}
	if s.LatencyTarget < 0 || s.LatencyTarget > time.Minute {
		return fmt.Errorf("latencyTargetP99 must be in [0, 1m], got %v", s.LatencyTarget)
	}
	return nil
}

// ValidateFleet validates every VM's SLA and checks that the floors of
// each managed resource fit the capacity. Errors name the VM and field;
// all are reported, VMs in name order.
func ValidateFleet(slas map[string]SLA, c Capacity) error {
	if err := c.Validate(); err != nil {
		return err
	}
	names := make([]string, 0, len(slas))
	for n := range slas {
		names = append(names, n)
	}
	sort.Strings(names)
	var errs []error
	var sum [NumResources]int64
	for _, n := range names {
		s := slas[n]
		if n == "" {
			errs = append(errs, errors.New("vm with an empty name"))
			continue
		}
		if err := s.Validate(); err != nil {
			errs = append(errs, fmt.Errorf("vm %s: %w", n, err))
			continue
		}
		for r := CPU; r < NumResources; r++ {
			if f, _, ok := s.Bounds(r); ok {
				sum[r] += f
			}
		}
	}
	for r := CPU; r < NumResources; r++ {
		if a := c.Allocatable(r); a > 0 && sum[r] > a {
			errs = append(errs, fmt.Errorf("%s: floors sum to %d, above the allocatable %d (%s)", fieldNames[r][0], sum[r], a, floorList(slas, names, r)))
		}
	}
	return errors.Join(errs...)
}

func floorList(slas map[string]SLA, names []string, r Resource) string {
	var b strings.Builder
	for i, n := range names {
		f, _, ok := slas[n].Bounds(r)
		if !ok {
			continue
		}
		if i > 0 && b.Len() > 0 {
			b.WriteString(", ")
		}
		if b.Len() > 200 {
			b.WriteString("...")
			break
		}
		fmt.Fprintf(&b, "vm %s %d", n, f)
	}
	return b.String()
}

// Fleet is an SLA file: host capacity, the SLA of VMs it does not name,
// and per-VM SLAs. Per-VM entries are complete SLAs: unset fields are
// zero, not inherited from default.
type Fleet struct {
	Capacity Capacity       `yaml:"capacity"`
	Default  *SLA           `yaml:"default"`
	VMs      map[string]SLA `yaml:"vms"`
}

// ParseFleet decodes an SLA file (YAML, at most 1 MiB; unknown keys are
// errors naming the key) and validates it with ValidateFleet.
func ParseFleet(r io.Reader) (Fleet, error) {
	var f Fleet
	b, err := io.ReadAll(io.LimitReader(r, 1<<20+1))
	if err != nil {
		return f, err
	}
	if len(b) > 1<<20 {
		return f, errors.New("sla file larger than 1 MiB")
	}
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&f); err != nil && !errors.Is(err, io.EOF) {
		return Fleet{}, fmt.Errorf("sla file: %w", err)
	}
	if f.Default != nil {
		if err := f.Default.Validate(); err != nil {
			return Fleet{}, fmt.Errorf("default: %w", err)
		}
	}
	if err := ValidateFleet(f.VMs, f.Capacity); err != nil {
		return Fleet{}, err
	}
	return f, nil
}

// vmNameRE is what a VM name may be: the QMP socket's base name, used as
// a key in SLA files, the policy file, the control API, metrics labels
// and DRM rows.
var vmNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$`)

// ValidVMName reports whether name is an acceptable VM name: a letter or
// digit, then up to 62 letters, digits, '_', '.' or '-'.
func ValidVMName(name string) bool { return vmNameRE.MatchString(name) }
