package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

const (
	ioTick     = 100 * time.Millisecond
	ioBlockMax = 64 << 10 // largest single write
	ioAlign    = 4096     // O_DIRECT alignment
)

// diskLoad writes KiB/s to a block device with O_DIRECT, so every byte
// reaches QEMU (and, with cache=none, the host's block layer) at the rate
// asked. It writes sequentially and wraps at the end of the device.
type diskLoad struct {
	path string
	logf func(string, ...any)
	kib  atomic.Int64
	wake chan struct{}

	mu     sync.Mutex
	f      *os.File
	size   int64
	buf    []byte
	off    int64
	Errors atomic.Int64
}

func newDiskLoad(path string, logf func(string, ...any)) *diskLoad {
	return &diskLoad{path: path, logf: logf, wake: make(chan struct{}, 1)}
}

// Set changes the rate; opening the device happens on the first non-zero rate.
func (d *diskLoad) Set(kib int) error {
	if kib > 0 {
		if err := d.open(); err != nil {
			return err
		}
	}
	d.kib.Store(int64(kib))
	select {
	case d.wake <- struct{}{}:
	default:
	}
	return nil
}

func (d *diskLoad) open() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.f != nil {
		return nil
	}
	f, err := os.OpenFile(d.path, os.O_WRONLY|syscall.O_DIRECT, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", d.path, err)
	}
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil || size < ioBlockMax {
		f.Close()
		return fmt.Errorf("size of %s: %d bytes, %v", d.path, size, err)
	}
	// mmap gives page alignment, which O_DIRECT needs.
	buf, err := syscall.Mmap(-1, 0, ioBlockMax, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANON)
	if err != nil {
		f.Close()
		return fmt.Errorf("mmap io buffer: %w", err)
	}
	for i := range buf {
		buf[i] = byte(i * 7)
	}
	d.f, d.size, d.buf = f, size-size%ioAlign, buf
	return nil
}

// Run writes at the set rate until ctx ends. A token bucket carries
// fractions over ticks and caps bursts at one second's worth.
func (d *diskLoad) Run(ctx context.Context) {
	t := time.NewTicker(ioTick)
	defer t.Stop()
	t.Stop() // ticks only while the rate is non-zero
	var budget int64
	var last time.Time
	active := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-d.wake:
		}
		now := time.Now()
		rate := d.kib.Load() * 1024 // bytes per second
		if rate == 0 {
			budget, active = 0, false
			t.Stop()
			continue
		}
		if !active {
			// Start from an empty bucket, not from the time spent idle.
			last, active = now, true
		}
		t.Reset(ioTick)
		budget += int64(float64(rate) * now.Sub(last).Seconds())
		last = now
		if budget > rate {
			budget = rate
		}
		for budget >= ioAlign && ctx.Err() == nil {
			n := min(budget-budget%ioAlign, ioBlockMax)
			if err := d.write(n); err != nil {
				if d.Errors.Add(1) == 1 {
					d.logf("io: %v", err)
				}
				budget = 0
				break
			}
			budget -= n
		}
	}
}

func (d *diskLoad) write(n int64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.off+n > d.size {
		d.off = 0
	}
	if _, err := d.f.WriteAt(d.buf[:n], d.off); err != nil {
		return fmt.Errorf("write %d bytes at %d: %w", n, d.off, err)
	}
	d.off += n
	return nil
}
