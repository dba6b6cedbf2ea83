// Package ipc owns how ARS processes talk to each other and to their
// clients: length-prefixed frames, the Unix control socket (peer
// identified with SO_PEERCRED) that arsctl uses, and shared-memory rings
// (a sealed memfd mapped by both sides, single producer / single
// consumer, fixed records or frames, eventfd wake-ups) handed over with
// SCM_RIGHTS after a policy check of the peer, with a versioned frame
// envelope (type, generation, sequence) for the streams on them. arsd
// uses rings between its collector and engine processes, to feed
// `arsctl top`, and for the standby's replication stream.
package ipc

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// MaxFrame bounds one frame's payload. A peer announcing more is refused
// before anything is allocated.
const MaxFrame = 1 << 20

// ErrFrameTooLarge is returned for frames over MaxFrame.
var ErrFrameTooLarge = errors.New("ipc: frame larger than 1 MiB")

// WriteFrame writes a 4-byte big-endian length followed by payload.
func WriteFrame(w io.Writer, payload []byte) error {
	if len(payload) > MaxFrame {
		return ErrFrameTooLarge
	}
	buf := make([]byte, 4+len(payload))
	binary.BigEndian.PutUint32(buf, uint32(len(payload)))
	copy(buf[4:], payload)
	if _, err := w.Write(buf); err != nil {
		return fmt.Errorf("ipc: write frame: %w", err)
	}
	return nil
}

// ReadFrame reads one frame. A clean EOF before the header is io.EOF; a
// frame cut short is io.ErrUnexpectedEOF.
func ReadFrame(r io.Reader) ([]byte, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, io.EOF
		}
		return nil, fmt.Errorf("ipc: read frame header: %w", err)
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n > MaxFrame {
		return nil, fmt.Errorf("%w: header says %d bytes", ErrFrameTooLarge, n)
	}
	payload := make([]byte, n)
	if _, err := io.ReadFull(r, payload); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return nil, fmt.Errorf("ipc: read frame of %d bytes: %w", n, err)
	}
	return payload, nil
}
