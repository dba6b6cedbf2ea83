package qmp

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"

	goqmp "github.com/digitalocean/go-qemu/qmp"
)

// Kind says what a QMP server message is.
type Kind int

const (
	// KindGreeting is the {"QMP": {...}} banner sent on connect.
	KindGreeting Kind = iota + 1
	// KindReturn is a successful command reply {"return": ..., "id": ...}.
	KindReturn
	// KindError is a failed command reply {"error": {...}, "id": ...}.
	KindError
	// KindEvent is an asynchronous {"event": ..., "data": ..., "timestamp": ...}.
	KindEvent
)

func (k Kind) String() string {
	switch k {
	case KindGreeting:
		return "greeting"
	case KindReturn:
		return "return"
	case KindError:
		return "error"
	case KindEvent:
		return "event"
	}
	return fmt.Sprintf("kind(%d)", int(k))
}

// Greeting is the server banner.
type Greeting struct {
	Version      goqmp.Version `json:"version"`
	Capabilities []string      `json:"capabilities"`
}

// Message is one decoded server message. Exactly the fields of its Kind are set.
type Message struct {
	Kind Kind
	// ID is the echoed command id when it is a JSON string; HasID says
	// whether the message carried an id at all.
	ID    string
	HasID bool
	// Return is the raw "return" value of a KindReturn.
	Return json.RawMessage
	// Class and Desc describe a KindError.
	Class, Desc string
	// Event is set for KindEvent.
	Event goqmp.Event
	// Greeting is set for KindGreeting.
	Greeting Greeting
}

// errMalformed marks messages that are not valid QMP.
var errMalformed = errors.New("malformed QMP message")

// DecodeMessage parses and validates one QMP server message (one line,
// without the line terminator). It never panics; anything that is not a
// well-formed greeting, reply or event is an error wrapping a description.
func DecodeMessage(b []byte) (Message, error) {
	var m Message
	b = bytes.Trim(b, " \t\r\n") // JSON whitespace only (TrimSpace would also drop \v, \f, U+0085)
	if len(b) == 0 || b[0] != '{' {
		return m, fmt.Errorf("%w: not a JSON object", errMalformed)
	}
	var top map[string]json.RawMessage
	if err := json.Unmarshal(b, &top); err != nil {
		return m, fmt.Errorf("%w: %v", errMalformed, err)
	}
	if rawID, ok := top["id"]; ok {
		m.HasID = true
		var s string
		if json.Unmarshal(rawID, &s) == nil {
			m.ID = s
		}
	}
	_, isRet := top["return"]
	_, isErr := top["error"]
	_, isEv := top["event"]
	_, isGreet := top["QMP"]
	n := 0
	for _, v := range []bool{isRet, isErr, isEv, isGreet} {
		if v {
			n++
		}
	}
	if n != 1 {
		return m, fmt.Errorf("%w: want exactly one of return, error, event, QMP; have %d", errMalformed, n)
	}
	switch {
	case isRet:
		m.Kind = KindReturn
		m.Return = append(json.RawMessage(nil), top["return"]...)
	case isErr:
		m.Kind = KindError
		var e struct {
			Class *string `json:"class"`
			Desc  *string `json:"desc"`
		}
		if err := json.Unmarshal(top["error"], &e); err != nil {
			return m, fmt.Errorf("%w: error member: %v", errMalformed, err)
		}
		if e.Class == nil || e.Desc == nil {
			return m, fmt.Errorf("%w: error member lacks class or desc", errMalformed)
		}
		m.Class, m.Desc = *e.Class, *e.Desc
	case isEv:
		m.Kind = KindEvent
		if err := json.Unmarshal(b, &m.Event); err != nil {
			return m, fmt.Errorf("%w: event: %v", errMalformed, err)
		}
		if m.Event.Event == "" {
			return m, fmt.Errorf("%w: event without a name", errMalformed)
		}
	case isGreet:
		m.Kind = KindGreeting
		if err := json.Unmarshal(top["QMP"], &m.Greeting); err != nil {
			return m, fmt.Errorf("%w: greeting: %v", errMalformed, err)
		}
	}
	return m, nil
}

// Error is a QMP error reply: the command ran and QEMU refused it.
type Error struct {
	Command string // the "execute" name
	Class   string // e.g. GenericError, CommandNotFound, DeviceNotFound
	Desc    string // QEMU's human-readable description
}

func (e *Error) Error() string {
	return fmt.Sprintf("qmp: %s: %s: %s", e.Command, e.Class, e.Desc)
}

// IsClass reports whether err is a QMP *Error of the given class.
func IsClass(err error, class string) bool {
	var qe *Error
	return errors.As(err, &qe) && qe.Class == class
}
