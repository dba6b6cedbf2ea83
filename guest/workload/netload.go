package main

import (
	"context"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

const (
	netTick    = 20 * time.Millisecond
	netPayload = 1000 // UDP payload bytes per datagram
)

// netLoad sends UDP datagrams to the discard port of the host end of the
// tap. The rate counts UDP payload; on the wire each 1000-byte datagram is a
// 1042-byte Ethernet frame. The socket is unconnected, so the host's ICMP
// port-unreachable replies do not turn into send errors.
type netLoad struct {
	src, dst string
	logf     func(string, ...any)
	kbps     atomic.Int64
	wake     chan struct{}

	mu     sync.Mutex
	conn   net.PacketConn
	addr   *net.UDPAddr
	Errors atomic.Int64
}

func newNetLoad(src, dst string, logf func(string, ...any)) *netLoad {
	return &netLoad{src: src, dst: dst, logf: logf, wake: make(chan struct{}, 1)}
}

// Set changes the rate; the socket is opened on the first non-zero rate.
func (n *netLoad) Set(kbps int) error {
	if kbps > 0 {
		if err := n.open(); err != nil {
			return err
		}
	}
	n.kbps.Store(int64(kbps))
	select {
	case n.wake <- struct{}{}:
	default:
	}
	return nil
}

func (n *netLoad) open() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.conn != nil {
		return nil
	}
	addr, err := net.ResolveUDPAddr("udp4", n.dst)
	if err != nil {
		return fmt.Errorf("resolve %s: %w", n.dst, err)
	}
	c, err := net.ListenPacket("udp4", n.src)
	if err != nil {
		return fmt.Errorf("udp socket on %s: %w", n.src, err)
	}
	n.conn, n.addr = c, addr
	return nil
}

// Run sends at the set rate until ctx ends.
func (n *netLoad) Run(ctx context.Context) {
	t := time.NewTicker(netTick)
	defer t.Stop()
	t.Stop() // ticks only while the rate is non-zero
	payload := make([]byte, netPayload)
	for i := range payload {
		payload[i] = byte(i)
	}
	var budget float64
	var last time.Time
	active := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-n.wake:
		}
		now := time.Now()
		rate := float64(n.kbps.Load()) * 1000 / 8 // bytes per second
		if rate == 0 {
			budget, active = 0, false
			t.Stop()
			continue
		}
		if !active {
			// Start from an empty bucket, not from the time spent idle.
			last, active = now, true
		}
		t.Reset(netTick)
		budget += rate * now.Sub(last).Seconds()
		last = now
		if budget > rate {
			budget = rate
		}
		n.mu.Lock()
		c, addr := n.conn, n.addr
		n.mu.Unlock()
		for budget >= netPayload && ctx.Err() == nil {
			if _, err := c.WriteTo(payload, addr); err != nil {
				if n.Errors.Add(1) == 1 {
					n.logf("net: %v", err)
				}
			}
			budget -= netPayload
		}
	}
}
