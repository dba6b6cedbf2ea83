//go:build linux

package telemetry

import (
	"testing"

	"github.com/ars-dev/ars/internal/testutil"
)

// TestKVMExitsLoadAttach loads and attaches tp_btf/kvm_exit. Under TCG no
// KVM exits happen, so only loading, attaching, Track/Read/Untrack are
// checked; the counts are not faked.
func TestKVMExitsLoadAttach(t *testing.T) {
	testutil.RequireBTF(t)
	k, err := LoadKVMExits()
	if err != nil {
		t.Fatalf("LoadKVMExits: %+v", err)
	}
	t.Cleanup(func() {
		if err := k.Close(); err != nil {
			t.Error(err)
		}
	})
	if err := k.Track(12345, 0); err != nil {
		t.Fatal(err)
	}
	got, err := k.Read()
	if err != nil {
		t.Fatal(err)
	}
	if n, ok := got[12345]; !ok || n != 0 {
		t.Errorf("Read = %v, want {12345: 0}", got)
	}
	if err := k.Untrack(12345); err != nil {
		t.Fatal(err)
	}
	if got, _ := k.Read(); len(got) != 0 {
		t.Errorf("after Untrack Read = %v", got)
	}
}
