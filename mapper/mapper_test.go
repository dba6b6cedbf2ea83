package mapper

import (
	"strings"
	"testing"
)

func TestTableGenerations(t *testing.T) {
	tb := New()
	g1 := tb.Put(VM{Name: "b", PID: 2, VCPUs: []VCPU{{0, 20}}})
	g2 := tb.Put(VM{Name: "a", PID: 1, VCPUs: []VCPU{{0, 10}, {1, 11}}})
	if g1 != 1 || g2 != 2 {
		t.Fatalf("generations %d %d, want 1 2", g1, g2)
	}
	if g := tb.Put(VM{Name: "a", PID: 1, VCPUs: []VCPU{{0, 10}, {1, 11}}}); g != 2 {
		t.Fatalf("unchanged Put bumped generation to %d", g)
	}
	g3, err := tb.SetCPU("a", CPU{Cgroup: "/sys/fs/cgroup/cpu/x", Version: "v1", QuotaUs: 50000, PeriodUs: 100000, Millicores: 500})
	if err != nil || g3 != 3 {
		t.Fatalf("SetCPU = %d, %v", g3, err)
	}
	if _, err := tb.SetCPU("nope", CPU{}); err == nil {
		t.Fatal("SetCPU on unknown VM accepted")
	}
	s := tb.Snapshot()
	if s.Generation != 3 || len(s.VMs) != 2 || s.VMs[0].Name != "a" || s.VMs[0].Generation != 3 {
		t.Fatalf("snapshot %+v", s)
	}
	// Snapshots are copies.
	s.VMs[0].VCPUs[0].TID = 999
	if vm, _ := tb.Get("a"); vm.VCPUs[0].TID != 10 {
		t.Fatal("snapshot aliases the table")
	}
	var keys []string
	for _, r := range s.Rows() {
		keys = append(keys, r.Key)
	}
	want := "vm/a vm/a/vcpu/0 vm/a/vcpu/1 vm/a/cpu vm/b vm/b/vcpu/0 vm/b/cpu"
	if got := strings.Join(keys, " "); got != want {
		t.Fatalf("rows %q, want %q", got, want)
	}
	if g := tb.Remove("b"); g != 4 {
		t.Fatalf("Remove generation %d", g)
	}
	if g := tb.Remove("b"); g != 4 {
		t.Fatalf("Remove of absent VM bumped generation to %d", g)
	}
}
