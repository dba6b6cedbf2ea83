package main

import (
	"encoding/json"
	"testing"

	"github.com/ars-dev/ars/ipc"
	"github.com/ars-dev/ars/synthesizer"
)

// FuzzControlParams feeds the control API's request decoding end to end —
// the frame's JSON (ipc.DecodeRequest), the sla params (slaVM) and the
// SLA text (ParseSLA) — with arbitrary bytes: no panic, and what is
// accepted is valid. Seeds are in testdata/fuzz/FuzzControlParams.
func FuzzControlParams(f *testing.F) {
	f.Add([]byte(`{"method":"sla.set","params":{"vm":"web","sla":"cpu: {floorMillicores: 250, ceilingMillicores: 900}\n"}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		req, err := ipc.DecodeRequest(b)
		if err != nil {
			return
		}
		vm, err := slaVM(req.Params)
		if err != nil {
			return
		}
		if !synthesizer.ValidVMName(vm) {
			t.Fatalf("accepted VM name %q", vm)
		}
		var p SLAParams
		if err := ipc.DecodeParams(req.Params, &p); err != nil {
			t.Fatalf("slaVM accepted params DecodeParams refuses: %v", err)
		}
		sla, err := ParseSLA(p.SLA)
		if err != nil {
			return
		}
		if err := sla.Validate(); err != nil {
			t.Fatalf("ParseSLA accepted an invalid SLA: %v", err)
		}
		if _, err := json.Marshal(sla); err != nil {
			t.Fatal(err)
		}
	})
}
