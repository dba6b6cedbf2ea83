package synthesizer

import (
	"strings"
	"testing"
	"time"
)

func TestSLAValidateFields(t *testing.T) {
	base := DefaultSLA()
	cases := []struct {
		mod  func(*SLA)
		want string
	}{
		{func(s *SLA) { s.CPU.FloorMillicores = 5 }, "cpu.floorMillicores"},
		{func(s *SLA) { s.CPU.CeilingMillicores = 100 }, "cpu.ceilingMillicores (100) is below"},
		{func(s *SLA) { s.Memory = MemorySLA{FloorMiB: 512, CeilingMiB: 256} }, "memory.ceilingMiB (256) is below memory.floorMiB"},
		{func(s *SLA) { s.Memory = MemorySLA{FloorMiB: 512} }, "memory.floorMiB is 512 but memory.ceilingMiB is 0"},
		{func(s *SLA) { s.Disk.FloorIOPS = -1; s.Disk.CeilingIOPS = 10 }, "disk.floorIOPS must be >= 0"},
		{func(s *SLA) { s.Disk.CeilingBytesPerSec = 1 << 50 }, "disk.ceilingBytesPerSec"},
		{func(s *SLA) { s.Network.CeilingBitsPerSec = 1 << 50 }, "check the unit"},
		{func(s *SLA) { s.Class = "gold" }, `unknown priority class "gold"`},
		{func(s *SLA) { s.Priority = 1000 }, "priority must be in [0, 999]"},
		{func(s *SLA) { s.TargetViolation = 0.7 }, "targetViolation"},
		{func(s *SLA) { s.LatencyTarget = -1 }, "latencyTargetP99"},
	}
	for _, c := range cases {
		s := base
		c.mod(&s)
		err := s.Validate()
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("want %q, got %v", c.want, err)
		}
	}
	if err := base.Validate(); err != nil {
		t.Fatal(err)
	}
	ok := base
	ok.Class, ok.Priority, ok.Memory = Critical, 7, MemorySLA{FloorMiB: 256, CeilingMiB: 1024}
	if err := ok.Validate(); err != nil {
		t.Fatal(err)
	}
	if f, c, m := ok.Bounds(Memory); f != 256 || c != 1024 || !m {
		t.Fatal(f, c, m)
	}
	if _, _, m := ok.Bounds(Network); m {
		t.Fatal("network managed without a ceiling")
	}
	if !(SLA{Class: Critical}.Rank() > SLA{Class: Standard, Priority: 999}.Rank()) || !(SLA{Priority: 2}.Rank() > SLA{Class: Standard, Priority: 1}.Rank()) {
		t.Fatal("rank order")
	}
}

func TestParseFleet(t *testing.T) {
	good := `
capacity:
  cpuMillicores: {total: 8000, reserved: 1000}
  memoryMiB: {total: 16384, reserved: 2048}
default:
  cpu: {floorMillicores: 100, ceilingMillicores: 2000}
vms:
  web:
    cpu: {floorMillicores: 2000, ceilingMillicores: 6000}
    memory: {floorMiB: 1024, ceilingMiB: 8192}
    class: critical
    priority: 10
    targetViolation: 0.01
    latencyTargetP99: 5ms
    allowTopologyChanges: true
  batch:
    cpu: {floorMillicores: 500, ceilingMillicores: 6000}
    class: best-effort
`
	f, err := ParseFleet(strings.NewReader(good))
	if err != nil {
		t.Fatal(err)
	}
	if f.Capacity.Allocatable(CPU) != 7000 || f.VMs["web"].Class != Critical || f.VMs["web"].LatencyTarget.Milliseconds() != 5 || f.Default == nil {
		t.Fatalf("%+v", f)
	}
	bad := []struct{ in, want string }{
		{"vms:\n  a:\n    cpu: {floorMillicores: 100, ceilingMillicores: 200, burst: 3}\n", "field burst not found"},
		{"vms:\n  a:\n    cpu: {floorMillicores: 1 core}\n", "cannot unmarshal"},
		{"vms:\n  a:\n    cpu: {floorMillicores: 300, ceilingMillicores: 200}\n", "vm a: cpu.ceilingMillicores (200) is below"},
		{"capacity:\n  cpuMillicores: {total: 1000}\nvms:\n  a:\n    cpu: {floorMillicores: 600, ceilingMillicores: 900}\n  b:\n    cpu: {floorMillicores: 600, ceilingMillicores: 900}\n", "cpu.floorMillicores: floors sum to 1200, above the allocatable 1000 (vm a 600, vm b 600)"},
		{"capacity:\n  cpuMillicores: {total: 1000, reserved: 1000}\n", "capacity.cpuMillicores.reserved (1000) leaves nothing"},
		{"default:\n  cpu: {floorMillicores: 1}\n", "default: cpu.floorMillicores"},
		{"vms:\n  a:\n    class: gold\n    cpu: {floorMillicores: 100, ceilingMillicores: 200}\n", `vm a: class: unknown priority class "gold"`},
	}
	for _, b := range bad {
		_, err := ParseFleet(strings.NewReader(b.in))
		if err == nil || !strings.Contains(err.Error(), b.want) {
			t.Errorf("%q: want %q, got %v", b.in, b.want, err)
		}
	}
}

func FuzzParseFleet(f *testing.F) {
	f.Add("capacity:\n  cpuMillicores: {total: 8000, reserved: 1000}\nvms:\n  a:\n    cpu: {floorMillicores: 100, ceilingMillicores: 200}\n    class: critical\n")
	f.Add("vms:\n  a:\n    memory: {floorMiB: 1, ceilingMiB: 0}\n")
	f.Fuzz(func(t *testing.T, in string) {
		fl, err := ParseFleet(strings.NewReader(in))
		if err != nil {
			return
		}
		// Whatever parses must plan without error.
		p, err := NewPlanner(DefaultPlannerConfig(), func() time.Time { return time.Unix(0, 0) })
		if err != nil {
			t.Fatal(err)
		}
		var vms []VMInput
		for name, s := range fl.VMs {
			if name == "" {
				continue
			}
			vms = append(vms, VMInput{Name: name, SLA: s})
		}
		if _, err := p.Plan(vms, fl.Capacity); err != nil {
			t.Fatalf("valid fleet does not plan: %v", err)
		}
	})
}
