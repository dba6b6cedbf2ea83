package ipc

import (
	"encoding/json"
	"testing"
)

// FuzzDecodeRequest checks that the control request decoder never panics
// and that what it accepts holds its promises: a well-formed method name,
// params that are an object or absent, nothing over MaxRequest. Seeds are
// in testdata/fuzz/FuzzDecodeRequest.
func FuzzDecodeRequest(f *testing.F) {
	f.Add([]byte(`{"method":"sla.set","params":{"vm":"web","sla":"cpu: {floorMillicores: 100}"}}`))
	f.Add([]byte(`{"method":"status"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		req, err := DecodeRequest(b)
		if err != nil {
			return
		}
		if len(b) > MaxRequest {
			t.Fatalf("accepted %d bytes", len(b))
		}
		if !methodName.MatchString(req.Method) {
			t.Fatalf("accepted method %q", req.Method)
		}
		if len(req.Params) > 0 && !json.Valid(req.Params) {
			t.Fatalf("params %q not JSON", req.Params)
		}
		var p struct {
			VM  string `json:"vm"`
			SLA string `json:"sla"`
		}
		_ = DecodeParams(req.Params, &p)
	})
}
