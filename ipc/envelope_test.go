package ipc

import (
	"bytes"
	"errors"
	"testing"
)

func TestEnvelopeRoundTrip(t *testing.T) {
	for _, e := range []Envelope{
		{Type: FrameSamples, Generation: 1, Seq: 7, Payload: []byte("abc")},
		{Type: FrameReplDelta, Generation: 1 << 40, Seq: 1<<64 - 1, Payload: []byte{}},
		{Type: FrameType(200), Generation: 0, Seq: 0, Payload: bytes.Repeat([]byte{9}, 1000)},
	} {
		b := AppendEnvelope(nil, e)
		if len(b) != EnvelopeHeaderSize+len(e.Payload) {
			t.Fatalf("%v: %d bytes", e.Type, len(b))
		}
		got, err := DecodeEnvelope(b)
		if err != nil {
			t.Fatal(err)
		}
		if got.Type != e.Type || got.Generation != e.Generation || got.Seq != e.Seq || !bytes.Equal(got.Payload, e.Payload) {
			t.Fatalf("round trip %+v -> %+v", e, got)
		}
	}
}

func TestEnvelopeRefusals(t *testing.T) {
	good := AppendEnvelope(nil, Envelope{Type: FrameStatus, Seq: 1, Payload: []byte("{}")})
	for name, mut := range map[string]func([]byte){
		"magic":    func(b []byte) { b[0] ^= 1 },
		"version":  func(b []byte) { b[2] = 2 },
		"type 0":   func(b []byte) { b[3] = 0 },
		"flags":    func(b []byte) { b[4] = 1 },
		"reserved": func(b []byte) { b[7] = 1 },
	} {
		b := append([]byte(nil), good...)
		mut(b)
		if _, err := DecodeEnvelope(b); !errors.Is(err, ErrEnvelope) {
			t.Errorf("%s: %v, want ErrEnvelope", name, err)
		}
	}
	for n := 0; n < EnvelopeHeaderSize; n++ {
		if _, err := DecodeEnvelope(good[:n]); !errors.Is(err, ErrEnvelope) {
			t.Errorf("truncated to %d: %v", n, err)
		}
	}
}

func TestSeqTracker(t *testing.T) {
	var tr SeqTracker
	steps := []struct {
		gen, seq uint64
		want     SeqCheck
	}{
		{1, 5, SeqNext}, {1, 6, SeqNext}, {1, 6, SeqStale}, {1, 3, SeqStale},
		{1, 9, SeqGap}, {1, 10, SeqNext}, {2, 1, SeqNewStream}, {1, 11, SeqStale}, {2, 2, SeqNext},
	}
	for i, s := range steps {
		if got := tr.Observe(Envelope{Type: FrameReplDelta, Generation: s.gen, Seq: s.seq}); got != s.want {
			t.Fatalf("step %d (gen %d seq %d): %v, want %v", i, s.gen, s.seq, got, s.want)
		}
	}
}

// FuzzDecodeEnvelope: any bytes either decode to an envelope that encodes
// back to the same bytes, or are refused with ErrEnvelope; never a panic.
// Seed corpus: testdata/fuzz/FuzzDecodeEnvelope.
func FuzzDecodeEnvelope(f *testing.F) {
	f.Add(AppendEnvelope(nil, Envelope{Type: FrameSamples, Generation: 1, Seq: 1, Payload: []byte{1, 2, 3}}))
	f.Add(AppendEnvelope(nil, Envelope{Type: FrameReplHeartbeat, Generation: 3, Seq: 99}))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		e, err := DecodeEnvelope(b)
		if err != nil {
			if !errors.Is(err, ErrEnvelope) {
				t.Fatalf("error not ErrEnvelope: %v", err)
			}
			return
		}
		if len(e.Payload) != len(b)-EnvelopeHeaderSize {
			t.Fatalf("payload %d of %d bytes", len(e.Payload), len(b))
		}
		if re := AppendEnvelope(nil, e); !bytes.Equal(re, b) {
			t.Fatalf("re-encoding differs:\n%x\n%x", re, b)
		}
		var tr SeqTracker
		tr.Observe(e)
		tr.Observe(e)
	})
}
