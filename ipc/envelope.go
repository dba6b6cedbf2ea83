package ipc

// Typed, versioned envelope for the frames that ride a ring: telemetry
// from the collector to the engine, status snapshots to `arsctl top`, and
// (agent/replica) the replication stream to a standby. Layout, little-
// endian, 24 bytes then the payload (the ring frame's length bounds it):
//
//	0   magic      u16  0xA5E7
//	2   version    u8   EnvelopeVersion
//	3   type       u8   FrameType
//	4   flags      u16  (none defined; must be 0)
//	6   reserved   u16  (must be 0)
//	8   generation u64  leader epoch / collector incarnation; a reader
//	                    treats a change as a new stream
//	16  seq        u64  per-stream sequence, +1 per frame of the stream
//	24  payload
//
// A decoder refuses unknown versions, flags and reserved bits instead of
// guessing; it accepts unknown types (the reader skips what it does not
// know), so a newer writer can add frame types without breaking readers.

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// EnvelopeVersion is the envelope format this build writes and reads.
const EnvelopeVersion = 1

// EnvelopeHeaderSize is the fixed header before the payload.
const EnvelopeHeaderSize = 24

const envelopeMagic = 0xA5E7

// FrameType says what a payload is.
type FrameType uint8

// Frame types. 1–15 engine/collector telemetry, 16–31 status, 32–63
// replication to a standby; the numbers are part of the wire format.
const (
	FrameSamples FrameType = 1 // collector → engine: per-tick vCPU stats (answers a read request)
	FrameSpike   FrameType = 2 // collector → engine: one run-queue delay spike
	FrameHello   FrameType = 3 // collector → engine: probe status after loading (JSON)

	FrameStatus FrameType = 16 // engine → top client: status.Snapshot (JSON)

	FrameReplSnapshot  FrameType = 32 // active → standby: full state at a sequence (DRM, SLAs, model state)
	FrameReplDelta     FrameType = 33 // active → standby: one change after the snapshot
	FrameReplHeartbeat FrameType = 34 // active → standby: liveness, no state
)

func (t FrameType) String() string {
	switch t {
	case FrameSamples:
		return "samples"
	case FrameSpike:
		return "spike"
	case FrameHello:
		return "hello"
	case FrameStatus:
		return "status"
	case FrameReplSnapshot:
		return "repl-snapshot"
	case FrameReplDelta:
		return "repl-delta"
	case FrameReplHeartbeat:
		return "repl-heartbeat"
	}
	return fmt.Sprintf("type-%d", uint8(t))
}

// Envelope is a decoded frame. Payload aliases the decoded buffer.
type Envelope struct {
	Type       FrameType
	Generation uint64
	Seq        uint64
	Payload    []byte
}

// ErrEnvelope: a frame that is not a valid envelope.
var ErrEnvelope = errors.New("ipc: bad envelope")

// AppendEnvelope appends e's encoding to dst.
func AppendEnvelope(dst []byte, e Envelope) []byte {
	var h [EnvelopeHeaderSize]byte
	le := binary.LittleEndian
	le.PutUint16(h[0:], envelopeMagic)
	h[2] = EnvelopeVersion
	h[3] = byte(e.Type)
	le.PutUint64(h[8:], e.Generation)
	le.PutUint64(h[16:], e.Seq)
	dst = append(dst, h[:]...)
	return append(dst, e.Payload...)
}

// DecodeEnvelope decodes one frame. The payload aliases b.
func DecodeEnvelope(b []byte) (Envelope, error) {
	if len(b) < EnvelopeHeaderSize {
		return Envelope{}, fmt.Errorf("%w: %d bytes, header is %d", ErrEnvelope, len(b), EnvelopeHeaderSize)
	}
	le := binary.LittleEndian
	if m := le.Uint16(b[0:]); m != envelopeMagic {
		return Envelope{}, fmt.Errorf("%w: magic %#x", ErrEnvelope, m)
	}
	if v := b[2]; v != EnvelopeVersion {
		return Envelope{}, fmt.Errorf("%w: version %d, this build reads %d", ErrEnvelope, v, EnvelopeVersion)
	}
	if f, r := le.Uint16(b[4:]), le.Uint16(b[6:]); f != 0 || r != 0 {
		return Envelope{}, fmt.Errorf("%w: unknown flags %#x / reserved %#x", ErrEnvelope, f, r)
	}
	if b[3] == 0 {
		return Envelope{}, fmt.Errorf("%w: type 0", ErrEnvelope)
	}
	return Envelope{Type: FrameType(b[3]), Generation: le.Uint64(b[8:]), Seq: le.Uint64(b[16:]),
		Payload: b[EnvelopeHeaderSize:]}, nil
}

// SeqCheck is what a stream reader learns from one envelope's position.
type SeqCheck int

const (
	SeqNext      SeqCheck = iota // the expected next frame (or the first one)
	SeqNewStream                 // a new generation: restart from this frame (a standby resyncs)
	SeqGap                       // frames were lost between the last one and this one
	SeqStale                     // a duplicate or an older frame, or an older generation: ignore it
)

func (c SeqCheck) String() string {
	return [...]string{"next", "new-stream", "gap", "stale"}[c]
}

// SeqTracker follows (generation, seq) of one stream, for a reader that
// must notice lost, repeated or fenced frames (the standby).
type SeqTracker struct {
	started bool
	gen     uint64
	seq     uint64
}

// Observe classifies e and, unless it is stale, makes it the latest.
func (t *SeqTracker) Observe(e Envelope) SeqCheck {
	switch {
	case !t.started:
		t.started, t.gen, t.seq = true, e.Generation, e.Seq
		return SeqNext
	case e.Generation < t.gen:
		return SeqStale
	case e.Generation > t.gen:
		t.gen, t.seq = e.Generation, e.Seq
		return SeqNewStream
	case e.Seq <= t.seq:
		return SeqStale
	case e.Seq == t.seq+1:
		t.seq = e.Seq
		return SeqNext
	default:
		t.seq = e.Seq
		return SeqGap
	}
}
