//go:build linux

package telemetry

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/cilium/ebpf/ringbuf"
)

// Spike is one run-queue delay of a tracked thread at or above the
// threshold set with Runqlat.SetSpikeThreshold.
type Spike struct {
	At       time.Duration // switch-in time, CLOCK_MONOTONIC since boot
	Delay    time.Duration // how long the thread waited for a CPU
	TID      uint32
	VMSlot   uint32
	VCPUSlot uint32
}

// ErrClosed is returned by SpikeReader.Read after Close.
var ErrClosed = errors.New("telemetry: reader closed")

// SpikeReader reads spike events from the kernel's ring buffer. Read blocks
// until an event arrives or the reader is closed; Close may be called from
// another goroutine to unblock it.
type SpikeReader struct {
	rd *ringbuf.Reader
}

// Spikes opens a reader of the spikes ring buffer. There should be one
// reader per Runqlat; events are delivered once.
func (r *Runqlat) Spikes() (*SpikeReader, error) {
	rd, err := ringbuf.NewReader(r.maps.Spikes)
	if err != nil {
		return nil, fmt.Errorf("runqlat: open spikes ring buffer: %w", err)
	}
	return &SpikeReader{rd: rd}, nil
}

// SetDeadline makes Read return os.ErrDeadlineExceeded after t (zero: no
// deadline).
func (s *SpikeReader) SetDeadline(t time.Time) { s.rd.SetDeadline(t) }

// Read returns the next spike event.
func (s *SpikeReader) Read() (Spike, error) {
	rec, err := s.rd.Read()
	if err != nil {
		if errors.Is(err, ringbuf.ErrClosed) {
			return Spike{}, ErrClosed
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return Spike{}, err
		}
		return Spike{}, fmt.Errorf("runqlat: read spike: %w", err)
	}
	var e runqlatSpikeEvent
	if _, err := binary.Decode(rec.RawSample, binary.LittleEndian, &e); err != nil {
		return Spike{}, fmt.Errorf("runqlat: decode spike (%d bytes): %w", len(rec.RawSample), err)
	}
	return Spike{
		At:       time.Duration(e.TsNs),
		Delay:    time.Duration(e.DelayNs),
		TID:      e.Tid,
		VMSlot:   e.VmSlot,
		VCPUSlot: e.VcpuSlot,
	}, nil
}

// Close releases the reader and unblocks a pending Read.
func (s *SpikeReader) Close() error { return s.rd.Close() }
