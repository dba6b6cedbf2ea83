package synthesizer

import (
	"testing"
)

func TestSLAValidate(t *testing.T) {
	bad := []SLA{
		{CPU: CPUSLA{FloorMillicores: 500, CeilingMillicores: 100}},
		{CPU: CPUSLA{FloorMillicores: 0, CeilingMillicores: 100}},
		{CPU: CPUSLA{FloorMillicores: 100, CeilingMillicores: 2_000_000}},
	}
	for _, s := range bad {
		if err := s.Validate(); err == nil {
			t.Errorf("Validate(%+v) accepted", s)
		}
	}
	if err := DefaultSLA().Validate(); err != nil {
		t.Fatal(err)
	}
}
