//go:build linux

package telemetry

import (
	"errors"
	"os"
	"testing"
	"time"
)

// TestSpikesAndRingbufFull: with the threshold at 0 no spike is sent; at
// 1 ns every delay of a tracked thread is one, nobody reads, and the 64 KiB
// ring buffer fills: the drops are counted (Errors().Ringbuf) and the
// events that fit are read back with the right thread and slots.
func TestSpikesAndRingbufFull(t *testing.T) {
	r := newRunqlat(t)
	c := startContention(t, lastAllowedCPU(t), []pattern{
		{Name: "a", Spin: 200 * time.Microsecond, Sleep: 50 * time.Microsecond},
		{Name: "b", Spin: 200 * time.Microsecond, Sleep: 50 * time.Microsecond},
	})
	for i, tid := range c.tids {
		if err := r.Track(tid, 9, uint32(i)); err != nil {
			t.Fatal(err)
		}
	}
	rd, err := r.Spikes()
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()

	// Threshold 0 (default): nothing.
	time.Sleep(100 * time.Millisecond) // some delays already, while parked: none
	rd.SetDeadline(time.Now().Add(50 * time.Millisecond))
	if sp, err := rd.Read(); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("spike %+v with threshold 0 (err %v)", sp, err)
	}

	if err := r.SetSpikeThreshold(time.Nanosecond); err != nil {
		t.Fatal(err)
	}
	c.run(time.Second)
	e, err := r.Errors()
	if err != nil {
		t.Fatal(err)
	}
	if e.Ringbuf == 0 {
		t.Errorf("ring buffer never full with every delay a spike and no reader: %+v", e)
	}
	n := 0
	for ; ; n++ {
		rd.SetDeadline(time.Now().Add(20 * time.Millisecond))
		sp, err := rd.Read()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if sp.VMSlot != 9 || sp.VCPUSlot > 1 || sp.TID != c.tids[sp.VCPUSlot] || sp.Delay <= 0 || sp.At <= 0 {
			t.Fatalf("spike %+v: want one of %v with vm slot 9", sp, c.tids)
		}
	}
	t.Logf("%d spikes read, %d dropped (ring buffer full)", n, e.Ringbuf)
	if n < 1000 {
		t.Errorf("only %d spikes read back from a full 64 KiB ring buffer", n)
	}
}
