package ipc

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"
)

// Feed broadcasts the latest of a series of frames (status snapshots for
// `arsctl top`) to every client of a RingServer, each on its own ring.
// Publish never blocks: a client whose ring is full skips frames (it gets
// the newest once it has room) and a dead client's producer is dropped
// when its pidfd or socket says so. The publisher is never slowed by any
// client.
type Feed struct {
	mu      sync.Mutex
	frame   []byte
	version uint64
	changed chan struct{} // closed and replaced by Publish

	// Dropped counts frames a client skipped because its ring was full.
	Dropped atomic.Uint64
}

// NewFeed returns an empty feed.
func NewFeed() *Feed { return &Feed{changed: make(chan struct{})} }

// Publish makes frame the latest (the feed keeps frame; do not modify it).
func (f *Feed) Publish(frame []byte) {
	f.mu.Lock()
	f.frame = frame
	f.version++
	close(f.changed)
	f.changed = make(chan struct{})
	f.mu.Unlock()
}

func (f *Feed) latest() ([]byte, uint64, <-chan struct{}) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.frame, f.version, f.changed
}

// Serve is a RingServer produce callback: it writes the latest frame now
// and every newer one until ctx ends or the client goes away.
func (f *Feed) Serve(ctx context.Context, _ Peer, p *Producer) {
	var sent uint64
	check := time.NewTicker(time.Second)
	defer check.Stop()
	for {
		frame, v, changed := f.latest()
		if v != sent && frame != nil {
			err := p.TryWriteFrame(frame)
			switch {
			case err == nil:
				p.Flush()
				sent = v
			case errors.Is(err, ErrWouldBlock):
				f.Dropped.Add(1)
				sent = v // skip it: the client reads the next one
			case errors.Is(err, ErrFrameTooLarge):
				sent = v
			default:
				return
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-changed:
		case <-check.C:
			if p.PeerGone() {
				return
			}
		}
	}
}
