package main

import (
	"context"
	"fmt"
	"sync"
	"syscall"
	"time"
)

const (
	chunkSize  = 1 << 20
	pageSize   = 4096
	touchEvery = 2 * time.Second
)

// memLoad keeps MiB-sized anonymous mappings outside the Go heap (so the GC
// neither counts nor frees them) and writes to every page of them
// periodically, so they stay resident and dirty.
type memLoad struct {
	mu     sync.Mutex
	chunks [][]byte
	gen    byte
}

// Set grows or shrinks the held memory to mib MiB, touching new chunks now.
func (m *memLoad) Set(mib int) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for len(m.chunks) < mib {
		b, err := syscall.Mmap(-1, 0, chunkSize, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANON)
		if err != nil {
			return fmt.Errorf("mmap chunk %d: %w", len(m.chunks), err)
		}
		touch(b, m.gen)
		m.chunks = append(m.chunks, b)
	}
	for len(m.chunks) > mib {
		last := m.chunks[len(m.chunks)-1]
		m.chunks = m.chunks[:len(m.chunks)-1]
		if err := syscall.Munmap(last); err != nil {
			return fmt.Errorf("munmap: %w", err)
		}
	}
	return nil
}

// Run re-touches the held memory until ctx ends.
func (m *memLoad) Run(ctx context.Context) {
	t := time.NewTicker(touchEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		m.mu.Lock()
		m.gen++
		for _, c := range m.chunks {
			touch(c, m.gen)
		}
		m.mu.Unlock()
	}
}

func touch(b []byte, v byte) {
	for i := 0; i < len(b); i += pageSize {
		b[i] = v
	}
}
