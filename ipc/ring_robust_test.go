package ipc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ars-dev/ars/internal/testutil"
)

// TestAttachRefusesTruncatedMemfd: a sealed memfd cut shorter than a
// ring (before sealing: sealed, it cannot be cut) is refused, whatever
// its header claims.
func TestAttachRefusesTruncatedMemfd(t *testing.T) {
	p, err := NewProducer(RingConfig{Capacity: 8192, RecordSize: 64})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	header := append([]byte(nil), p.mem[:ringHeaderSize]...)
	efd := func() int { fd, _ := unix.Eventfd(0, unix.EFD_CLOEXEC); return fd }
	for _, size := range []int64{0, 64, ringHeaderSize - 1, ringHeaderSize, ringHeaderSize + 4096} {
		fd, err := unix.MemfdCreate("trunc", unix.MFD_ALLOW_SEALING|unix.MFD_CLOEXEC)
		if err != nil {
			t.Fatal(err)
		}
		unix.Ftruncate(fd, size)
		n := min(int(size), len(header))
		if n > 0 {
			unix.Pwrite(fd, header[:n], 0) // the real header, claiming 8192 bytes of data
		}
		unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, RequiredSeals)
		if c, err := Attach(fd, efd(), RingParams{}, RingConfig{}); err == nil {
			c.Close()
			t.Errorf("memfd of %d bytes attached", size)
		} else {
			t.Logf("%d bytes: %v", size, err)
		}
	}
}

// TestFeedNeverBlocksOnSlowOrDeadClients: a client that never reads makes
// the feed drop frames, not wait; a client that hangs up is let go.
func TestFeedNeverBlocksOnSlowOrDeadClients(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f", "top.sock")
	s := NewRingServer(path, func(Peer, string) error { return nil }, RingConfig{Capacity: 4096, Batch: 1},
		slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err := s.Listen(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	feed := NewFeed()
	served := make(chan struct{}, 2)
	go s.Serve(ctx, func(ctx context.Context, peer Peer, p *Producer) {
		feed.Serve(ctx, peer, p)
		served <- struct{}{}
	})
	feed.Publish(AppendEnvelope(nil, Envelope{Type: FrameStatus, Seq: 1, Payload: []byte("first")}))
	slow, _, err := DialRing(ctx, path, nil, RingConfig{Spin: 10})
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Close()
	b, err := slow.ReadFrame()
	if err != nil {
		t.Fatal(err)
	}
	if e, err := DecodeEnvelope(b); err != nil || string(e.Payload) != "first" {
		t.Fatalf("first frame: %q %v", b, err)
	}
	// 1000 frames of 1 KiB into a 4 KiB ring nobody reads: Publish stays fast.
	start := time.Now()
	for i := 2; i < 1002; i++ {
		feed.Publish(AppendEnvelope(nil, Envelope{Type: FrameStatus, Seq: uint64(i), Payload: make([]byte, 1024)}))
		time.Sleep(10 * time.Microsecond)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("publishing to a stuck client took %v", d)
	}
	deadline := time.Now().Add(2 * time.Second)
	for feed.Dropped.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if feed.Dropped.Load() == 0 {
		t.Error("a full client ring dropped nothing")
	}
	// The slow client catches up to frames that are whole and in order.
	var last uint64
	for {
		b, err := slow.TryReadFrame()
		if errors.Is(err, ErrWouldBlock) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		e, err := DecodeEnvelope(b)
		if err != nil || e.Seq <= last {
			t.Fatalf("frame after %d: seq %d, %v", last, e.Seq, err)
		}
		last = e.Seq
	}
	// A client that goes away is let go within the feed's check period.
	slow.Close()
	select {
	case <-served:
	case <-time.After(3 * time.Second):
		t.Fatal("feed still serving a closed client")
	}
}

// TestRingRefusesOtherUID: a real process of another uid (nobody)
// reaches the ring socket (opened up for the test) and is refused by the
// RootOnly policy on its SO_PEERCRED, with no fd handed over; root is
// served.
func TestRingRefusesOtherUID(t *testing.T) {
	testutil.RequirePrivileged(t)
	dir, err := os.MkdirTemp("", "ars-ring-uid-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	// The test binary may sit in a 0700 build directory: give nobody a copy.
	bin := filepath.Join(dir, "ipc.test")
	if b, err := os.ReadFile(os.Args[0]); err != nil {
		t.Fatal(err)
	} else if err := os.WriteFile(bin, b, 0o755); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "r", "ring.sock")
	s := NewRingServer(path, RootOnly, RingConfig{Capacity: 4096, RecordSize: 64}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err := s.Listen(); err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	os.Chmod(filepath.Dir(path), 0o755)
	os.Chmod(path, 0o666) // only the peer-credential policy stands in the way
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	served := make(chan Peer, 2)
	go s.Serve(ctx, func(_ context.Context, peer Peer, p *Producer) { served <- peer })

	cmd := exec.Command(bin, "-test.run=^TestRingUIDClientHelper$", "-test.count=1")
	cmd.Env = append(os.Environ(), "ARS_RING_UID_CLIENT="+path)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534, Groups: []uint32{}}}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("helper as uid 65534: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "refused:") || !strings.Contains(string(out), "uid 65534") {
		t.Fatalf("uid 65534 was not refused by the policy:\n%s", out)
	}
	t.Logf("uid 65534: %s", strings.TrimSpace(string(out)))
	select {
	case p := <-served:
		t.Fatalf("a ring was produced for %+v", p)
	default:
	}
	c, _, err := DialRing(ctx, path, nil, RingConfig{})
	if err != nil {
		t.Fatalf("root refused: %v", err)
	}
	c.Close()
	if p := <-served; p.UID != 0 {
		t.Fatalf("served %+v", p)
	}
}

// TestRingUIDClientHelper is not a test: with ARS_RING_UID_CLIENT set it
// dials the ring and prints what happened.
func TestRingUIDClientHelper(t *testing.T) {
	path := os.Getenv("ARS_RING_UID_CLIENT")
	if path == "" {
		return
	}
	c, _, err := DialRing(context.Background(), path, nil, RingConfig{})
	if err != nil {
		fmt.Printf("refused: uid %d: %v\n", os.Getuid(), err)
		os.Exit(0)
	}
	c.Close()
	fmt.Println("attached")
	os.Exit(0)
}
