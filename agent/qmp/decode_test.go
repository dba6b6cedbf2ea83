package qmp

import (
	"bufio"
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

func TestDecodeMessage(t *testing.T) {
	cases := []struct {
		in   string
		kind Kind
		id   string
		bad  bool
	}{
		{in: `{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}`, kind: KindGreeting},
		{in: `{"return": {}, "id": "ars-1"}` + "\r\n", kind: KindReturn, id: "ars-1"},
		{in: `{"return": [1, 2]}`, kind: KindReturn},
		{in: `{"return": null, "id": 7}`, kind: KindReturn},
		{in: `{"error": {"class": "GenericError", "desc": "no"}, "id": "ars-2"}`, kind: KindError, id: "ars-2"},
		{in: `{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}`, kind: KindEvent},
		{in: `{"event": "X", "data": {"a": [1]}, "timestamp": {"seconds": 1, "microseconds": 2}}`, kind: KindEvent},
		{in: ``, bad: true},
		{in: `   `, bad: true},
		{in: `null`, bad: true},
		{in: `[]`, bad: true},
		{in: `{}`, bad: true},
		{in: `{"id": "x"}`, bad: true},
		{in: `{"return": 1, "event": "X"}`, bad: true},
		{in: `{"error": "string"}`, bad: true},
		{in: `{"error": {"desc": "d"}}`, bad: true},
		{in: `{"event": ""}`, bad: true},
		{in: `{"event": 5}`, bad: true},
		{in: `{"event": "X", "data": [1]}`, bad: true},
		{in: `{"QMP": 1}`, bad: true},
		{in: `{"return": }`, bad: true},
		{in: `{"return": {}} trailing`, bad: true},
	}
	for _, c := range cases {
		m, err := DecodeMessage([]byte(c.in))
		if c.bad {
			if err == nil || !errors.Is(err, ErrMalformed) {
				t.Errorf("%q: err = %v, want ErrMalformed", c.in, err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%q: %v", c.in, err)
			continue
		}
		if m.Kind != c.kind || m.ID != c.id {
			t.Errorf("%q: kind %v id %q, want %v %q", c.in, m.Kind, m.ID, c.kind, c.id)
		}
	}
}

func TestReadLine(t *testing.T) {
	in := "short\r\n" + strings.Repeat("x", 100) + "\nok\npartial"
	r := bufio.NewReaderSize(strings.NewReader(in), 16)
	line, err := readLine(r, 50)
	if err != nil || string(line) != "short\r\n" {
		t.Fatalf("first = %q, %v", line, err)
	}
	if _, err := readLine(r, 50); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("oversized: %v", err)
	}
	if line, err := readLine(r, 50); err != nil || string(line) != "ok\n" {
		t.Fatalf("after oversized = %q, %v (stream must stay in sync)", line, err)
	}
	if _, err := readLine(r, 50); err == nil || errors.Is(err, ErrTooLarge) {
		t.Fatalf("truncated tail: %v", err)
	}
}

// FuzzDecodeMessage checks that no input panics the decoder and that what
// it accepts is consistent. Seeds are in testdata/fuzz/FuzzDecodeMessage.
func FuzzDecodeMessage(f *testing.F) {
	f.Add([]byte(`{"return": {}, "id": "ars-1"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := DecodeMessage(b)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("error %v does not wrap ErrMalformed", err)
			}
			return
		}
		if !json.Valid(b) {
			t.Fatalf("accepted invalid JSON %q", b)
		}
		switch m.Kind {
		case KindReturn:
			if !json.Valid(m.Return) {
				t.Fatalf("return value %q is not JSON", m.Return)
			}
		case KindError, KindGreeting:
		case KindEvent:
			if m.Event.Event == "" {
				t.Fatal("event without name accepted")
			}
		default:
			t.Fatalf("accepted with kind %v", m.Kind)
		}
		if m.ID != "" && !m.HasID {
			t.Fatal("ID without HasID")
		}
	})
}
