package ipc

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// attachTo attaches a consumer to p's ring through dups of its fds, as a
// peer receiving them over SCM_RIGHTS would.
func attachTo(t testing.TB, p *Producer, cfg RingConfig) *Consumer {
	t.Helper()
	m, e := p.FDs()
	m2, err := unix.Dup(m)
	if err != nil {
		t.Fatal(err)
	}
	e2, err := unix.Dup(e)
	if err != nil {
		t.Fatal(err)
	}
	c, err := Attach(m2, e2, p.Params(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestRingRecordsTwoGoroutines(t *testing.T) {
	const n = 200000
	for _, rs := range []int{8, 64, 72} {
		t.Run(strconv.Itoa(rs), func(t *testing.T) {
			p, err := NewProducer(RingConfig{Capacity: rs * 61, RecordSize: rs, Batch: 16})
			if err != nil {
				t.Fatal(err)
			}
			c := attachTo(t, p, RingConfig{Batch: 16, Spin: 100})
			defer c.Close()
			go func() {
				rec := make([]byte, rs)
				for i := uint64(0); i < n; i++ {
					binary.LittleEndian.PutUint64(rec, i)
					rec[rs-1] = byte(i)
					if err := p.WriteRecord(rec); err != nil {
						t.Error(err)
						return
					}
				}
				p.Close()
			}()
			buf := make([]byte, rs)
			for i := uint64(0); i < n; i++ {
				if err := c.ReadRecord(buf); err != nil {
					t.Fatalf("record %d: %v", i, err)
				}
				want := make([]byte, rs)
				binary.LittleEndian.PutUint64(want, i)
				want[rs-1] = byte(i)
				if !bytes.Equal(buf, want) {
					t.Fatalf("record %d = %x, want %x", i, buf, want)
				}
			}
			if err := c.ReadRecord(buf); !errors.Is(err, io.EOF) {
				t.Fatalf("after close: %v, want EOF", err)
			}
		})
	}
}

func TestRingFramesTwoGoroutines(t *testing.T) {
	p, err := NewProducer(RingConfig{Capacity: 8192, Batch: 4})
	if err != nil {
		t.Fatal(err)
	}
	c := attachTo(t, p, RingConfig{Spin: 10})
	defer c.Close()
	const n = 20000
	sizes := rand.New(rand.NewSource(1))
	lens := make([]int, n)
	for i := range lens {
		switch i % 7 {
		case 0:
			lens[i] = 0
		case 1:
			lens[i] = int(p.maxFramePayload())
		default:
			lens[i] = sizes.Intn(1500)
		}
	}
	go func() {
		for i, l := range lens {
			f := bytes.Repeat([]byte{byte(i)}, l)
			if err := p.WriteFrame(f); err != nil {
				t.Error(err)
				return
			}
		}
		if err := p.WriteFrame(make([]byte, p.maxFramePayload()+1)); !errors.Is(err, ErrFrameTooLarge) {
			t.Errorf("oversized frame: %v", err)
		}
		p.Close()
	}()
	for i, l := range lens {
		f, err := c.ReadFrame()
		if err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
		if len(f) != l || (l > 0 && (f[0] != byte(i) || f[l-1] != byte(i))) {
			t.Fatalf("frame %d: %d bytes, want %d of %d", i, len(f), l, byte(i))
		}
	}
	if _, err := c.ReadFrame(); !errors.Is(err, io.EOF) {
		t.Fatalf("after close: %v", err)
	}
}

func TestRingTryAndBatching(t *testing.T) {
	p, _ := NewProducer(RingConfig{Capacity: 64 * 4, RecordSize: 64, Batch: 3})
	defer p.Close()
	c := attachTo(t, p, RingConfig{Batch: 1})
	defer c.Close()
	rec := make([]byte, 64)
	p.WriteRecord(rec)
	p.WriteRecord(rec)
	if err := c.TryReadRecord(rec); !errors.Is(err, ErrWouldBlock) {
		t.Fatalf("unpublished records visible: %v", err)
	}
	p.WriteRecord(rec) // third: batch published
	for i := 0; i < 3; i++ {
		if err := c.TryReadRecord(rec); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 4; i++ {
		if err := p.TryWriteRecord(rec); err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
	}
	if err := p.TryWriteRecord(rec); !errors.Is(err, ErrWouldBlock) {
		t.Fatalf("full ring: %v", err)
	}
	if err := p.WriteRecord(make([]byte, 63)); err == nil {
		t.Fatal("short record accepted")
	}
}

func TestAttachRefusesUnsealedOrBad(t *testing.T) {
	mk := func(seals int, size int64) int {
		fd, err := unix.MemfdCreate("t", unix.MFD_ALLOW_SEALING|unix.MFD_CLOEXEC)
		if err != nil {
			t.Fatal(err)
		}
		unix.Ftruncate(fd, size)
		if seals != 0 {
			if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, seals); err != nil {
				t.Fatal(err)
			}
		}
		return fd
	}
	efd := func() int { fd, _ := unix.Eventfd(0, unix.EFD_CLOEXEC); return fd }
	for _, tc := range []struct {
		name  string
		seals int
	}{{"none", 0}, {"shrink only", unix.F_SEAL_SHRINK}, {"no seal-seal", unix.F_SEAL_SHRINK | unix.F_SEAL_GROW}} {
		_, err := Attach(mk(tc.seals, ringHeaderSize+4096), efd(), RingParams{}, RingConfig{})
		if err == nil || !strings.Contains(err.Error(), "seals") {
			t.Errorf("%s: %v, want seal refusal", tc.name, err)
		}
	}
	// Sealed but not a ring.
	if _, err := Attach(mk(RequiredSeals, ringHeaderSize+4096), efd(), RingParams{}, RingConfig{}); err == nil || !errors.Is(err, ErrRingCorrupt) {
		t.Errorf("garbage header: %v", err)
	}
	// A pipe is not a memfd.
	var pp [2]int
	unix.Pipe2(pp[:], unix.O_CLOEXEC)
	unix.Close(pp[1])
	if _, err := Attach(pp[0], efd(), RingParams{}, RingConfig{}); err == nil {
		t.Error("pipe attached")
	}

	p, err := NewProducer(RingConfig{Capacity: 4096, RecordSize: 64})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	m, _ := p.FDs()
	if err := unix.Ftruncate(m, 1024); !errors.Is(err, unix.EPERM) {
		t.Errorf("shrinking a sealed ring: %v, want EPERM", err)
	}
	if err := unix.Ftruncate(m, 1<<20); !errors.Is(err, unix.EPERM) {
		t.Errorf("growing a sealed ring: %v, want EPERM", err)
	}
	if _, err := unix.FcntlInt(uintptr(m), unix.F_ADD_SEALS, unix.F_SEAL_WRITE); !errors.Is(err, unix.EPERM) {
		t.Errorf("adding a seal: %v, want EPERM", err)
	}
	// Announced parameters must match the header.
	m2, _ := unix.Dup(m)
	if _, err := Attach(m2, efd(), RingParams{Version: 1, Capacity: 4096, RecordSize: 32}, RingConfig{}); err == nil {
		t.Error("mismatched params accepted")
	}
	// Header capacity must match the file size.
	p.mem[offCapacity] = 0 // 4096 → 4096-... still a multiple? make it 8192
	binary.LittleEndian.PutUint64(p.mem[offCapacity:], 8192)
	m3, _ := unix.Dup(m)
	if _, err := Attach(m3, efd(), RingParams{}, RingConfig{}); err == nil || !strings.Contains(err.Error(), "memfd size") {
		t.Errorf("capacity beyond the file: %v", err)
	}
	binary.LittleEndian.PutUint64(p.mem[offCapacity:], 4096)
	binary.LittleEndian.PutUint32(p.mem[offVersion:], 2)
	m4, _ := unix.Dup(m)
	if _, err := Attach(m4, efd(), RingParams{}, RingConfig{}); err == nil || !strings.Contains(err.Error(), "version") {
		t.Errorf("version 2: %v", err)
	}
}

// TestRingHostilePeer scribbles random bytes over the whole shared mapping
// (header, indices, data) through a second mapping while a consumer reads:
// reads may fail, never panic.
func TestRingHostilePeer(t *testing.T) {
	for _, rs := range []int{0, 64} {
		t.Run(fmt.Sprintf("recsize=%d", rs), func(t *testing.T) {
			p, err := NewProducer(RingConfig{Capacity: 8192, RecordSize: rs})
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			c := attachTo(t, p, RingConfig{Spin: -1})
			defer c.Close()
			m, _ := p.FDs()
			evil, err := unix.Mmap(m, 0, ringHeaderSize+8192, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
			if err != nil {
				t.Fatal(err)
			}
			defer unix.Munmap(evil)
			var stop atomic.Bool
			var wg sync.WaitGroup
			wg.Add(1)
			go func() {
				defer wg.Done()
				rnd := rand.New(rand.NewSource(2))
				for !stop.Load() {
					off := rnd.Intn(len(evil) - 8)
					switch rnd.Intn(4) {
					case 0: // plausible head just past the tail
						atomic.StoreUint64((*uint64)(unsafePtr(evil, offHead)), atomic.LoadUint64((*uint64)(unsafePtr(evil, offTail)))+uint64(rnd.Intn(9000)))
					case 1:
						binary.LittleEndian.PutUint64(evil[offHead:], rnd.Uint64())
					default:
						binary.LittleEndian.PutUint64(evil[off&^7:], rnd.Uint64())
					}
				}
			}()
			var oks, errs int
			buf := make([]byte, 64)
			deadline := time.Now().Add(300 * time.Millisecond)
			for time.Now().Before(deadline) {
				var err error
				if rs == 0 {
					var f []byte
					f, err = c.TryReadFrame()
					if err == nil && uint64(len(f)) > c.maxFramePayload() {
						t.Fatalf("frame of %d bytes", len(f))
					}
				} else {
					err = c.TryReadRecord(buf)
				}
				switch {
				case err == nil:
					oks++
				case errors.Is(err, ErrWouldBlock):
				default:
					errs++
					// resynchronise, as a caller giving up on the peer would not;
					// we keep hammering to look for panics.
					c.tail = atomic.LoadUint64(c.u64(offHead)) &^ 63
					c.cachedHead = c.tail
					c.off = c.tail % c.capacity
				}
			}
			stop.Store(true)
			wg.Wait()
			t.Logf("reads ok %d, errors %d", oks, errs)
			if errs == 0 {
				t.Error("scribbling never produced an error")
			}
		})
	}
}

func TestRingCorruptIndices(t *testing.T) {
	p, _ := NewProducer(RingConfig{Capacity: 4096})
	defer p.Close()
	c := attachTo(t, p, RingConfig{})
	defer c.Close()
	p.WriteFrame([]byte("hello"))
	p.Flush()
	// Head beyond capacity.
	atomic.StoreUint64(p.u64(offHead), 1<<40)
	if _, err := c.TryReadFrame(); !errors.Is(err, ErrRingCorrupt) {
		t.Fatalf("head too far: %v", err)
	}
	// Frame length beyond the published bytes.
	atomic.StoreUint64(p.u64(offHead), 16)
	binary.NativeEndian.PutUint32(p.data[0:], 4000)
	if _, err := c.TryReadFrame(); !errors.Is(err, ErrRingCorrupt) {
		t.Fatalf("length past head: %v", err)
	}
	binary.NativeEndian.PutUint32(p.data[0:], frameSkip)
	if _, err := c.TryReadFrame(); !errors.Is(err, ErrRingCorrupt) {
		t.Fatalf("skip at start: %v", err)
	}
	// Producer side: a consumer announcing a tail ahead of head.
	atomic.StoreUint64(p.u64(offTail), 1<<50)
	p.cachedTail = 0
	p.head = 4096
	if err := p.TryWriteFrame([]byte("x")); !errors.Is(err, ErrRingCorrupt) {
		t.Fatalf("tail ahead of head: %v", err)
	}
}

// FuzzRingDecode runs the consumer's record and frame decoders over
// arbitrary ring contents: the first 16 bytes are head and tail, the rest
// fills the data area.
func FuzzRingDecode(f *testing.F) {
	seed := func(head, tail uint64, data []byte) []byte {
		b := make([]byte, 16, 16+len(data))
		binary.LittleEndian.PutUint64(b, head)
		binary.LittleEndian.PutUint64(b[8:], tail)
		return append(b, data...)
	}
	frame := func(payload string) []byte {
		b := make([]byte, alignUp(4+uint64(len(payload))))
		binary.NativeEndian.PutUint32(b, uint32(len(payload)))
		copy(b[4:], payload)
		return b
	}
	f.Add(seed(16, 0, append(frame("hello"), frame("world")...)))
	f.Add(seed(8, 0, frame("")))
	f.Add(seed(4096+8, 4088, []byte{0xff, 0xff, 0xff, 0xff}))
	f.Add(seed(1<<40, 0, nil))
	f.Add(seed(64, 0, []byte{0xff, 0xff, 0xff, 0x7f}))
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) < 16 {
			return
		}
		head := binary.LittleEndian.Uint64(b)
		tail := binary.LittleEndian.Uint64(b[8:]) &^ 7
		for _, rs := range []int{0, 24} {
			capa := 4096
			if rs > 0 {
				capa = rs * 170
			}
			c := fakeConsumer(capa, rs, b[16:])
			atomic.StoreUint64(c.u64(offHead), head)
			c.tail, c.cachedHead, c.published = tail, tail, tail
			if rs > 0 {
				c.tail -= c.tail % uint64(rs)
				c.cachedHead, c.published = c.tail, c.tail
				c.off = c.tail % c.capacity
			}
			for i := 0; i < 600; i++ {
				var err error
				if rs == 0 {
					var fr []byte
					fr, err = c.TryReadFrame()
					if uint64(len(fr)) > c.maxFramePayload() {
						t.Fatalf("frame of %d bytes", len(fr))
					}
				} else {
					err = c.TryReadRecord(make([]byte, rs))
				}
				if err != nil {
					break
				}
			}
		}
	})
}

// fakeConsumer builds a consumer over ordinary memory (no fds).
func fakeConsumer(capacity, recSize int, data []byte) *Consumer {
	mem := make([]byte, ringHeaderSize+capacity)
	copy(mem[ringHeaderSize:], data)
	c := &Consumer{ring: ring{mem: mem, data: mem[ringHeaderSize:], capacity: uint64(capacity),
		recSize: uint64(recSize), frames: recSize == 0, memfd: -1, efd: -1, spin: -1}, batch: 8}
	return c
}

func TestRingIdleConsumerCostsNoCPU(t *testing.T) {
	p, _ := NewProducer(RingConfig{Capacity: 4096, RecordSize: 64})
	c := attachTo(t, p, RingConfig{Spin: 1000})
	done := make(chan error, 1)
	go func() {
		buf := make([]byte, 64)
		done <- c.ReadRecord(buf)
	}()
	time.Sleep(100 * time.Millisecond) // past the spin phase
	before := cpuTime(t)
	time.Sleep(time.Second)
	used := cpuTime(t) - before
	t.Logf("process CPU over 1 s with an idle consumer: %v", used)
	if used > 30*time.Millisecond {
		t.Errorf("idle consumer used %v of CPU in 1 s", used)
	}
	if atomic.LoadUint32(p.u32(offSleeping)) != 1 {
		t.Error("consumer did not declare itself asleep")
	}
	// Wake-up by the producer.
	start := time.Now()
	p.WriteRecord(make([]byte, 64))
	p.Flush()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	t.Logf("wake-up latency %v", time.Since(start))
	p.Close()
	c.Close()
}

func cpuTime(t *testing.T) time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		t.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func TestRingInterrupt(t *testing.T) {
	p, _ := NewProducer(RingConfig{Capacity: 4096})
	defer p.Close()
	c := attachTo(t, p, RingConfig{Spin: 10})
	done := make(chan error, 1)
	go func() { _, err := c.ReadFrame(); done <- err }()
	time.Sleep(50 * time.Millisecond)
	c.Interrupt()
	select {
	case err := <-done:
		if !errors.Is(err, ErrRingClosed) {
			t.Fatalf("interrupted read: %v", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("Interrupt did not stop a blocked read")
	}
	c.Close()
}

// ------------------------------------------------------------- handshake

func TestRingHandshakeInProcess(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "r", "ring.sock")
	var denyMe atomic.Bool
	auth := func(p Peer, m string) error {
		if m != RingMethod {
			return fmt.Errorf("method %s", m)
		}
		if denyMe.Load() && p.UID == uint32(os.Getuid()) {
			return fmt.Errorf("uid %d not allowed", p.UID)
		}
		return nil
	}
	s := NewRingServer(path, auth, RingConfig{Capacity: 64 * 128, RecordSize: 64}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err := s.Listen(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	served := make(chan Peer, 4)
	go s.Serve(ctx, func(ctx context.Context, peer Peer, p *Producer) {
		served <- peer
		rec := make([]byte, 64)
		for i := 0; i < 1000; i++ {
			binary.LittleEndian.PutUint64(rec, uint64(i))
			if err := p.WriteRecord(rec); err != nil {
				// Later clients in this test hang up at once.
				if !errors.Is(err, ErrPeerGone) {
					t.Error(err)
				}
				return
			}
		}
	})
	c, srv, err := DialRing(ctx, path, func(p Peer, _ string) error {
		if p.PID != int32(os.Getpid()) {
			return fmt.Errorf("pid %d", p.PID)
		}
		return nil
	}, RingConfig{})
	if err != nil {
		t.Fatal(err)
	}
	if srv.PID != int32(os.Getpid()) {
		t.Errorf("server peer %+v", srv)
	}
	if got := <-served; got.PID != int32(os.Getpid()) {
		t.Errorf("client peer %+v", got)
	}
	buf := make([]byte, 64)
	for i := 0; i < 1000; i++ {
		if err := c.ReadRecord(buf); err != nil || binary.LittleEndian.Uint64(buf) != uint64(i) {
			t.Fatalf("record %d: %v %d", i, err, binary.LittleEndian.Uint64(buf))
		}
	}
	if err := c.ReadRecord(buf); !errors.Is(err, io.EOF) {
		t.Fatalf("after producer returned: %v", err)
	}
	c.Close()

	// Client refusing the server.
	if _, _, err := DialRing(ctx, path, func(Peer, string) error { return errors.New("not root") }, RingConfig{}); err == nil || !strings.Contains(err.Error(), "not trusted") {
		t.Fatalf("server auth: %v", err)
	}
	// Server refusing the client's uid.
	denyMe.Store(true)
	if _, _, err := DialRing(ctx, path, nil, RingConfig{}); err == nil || !strings.Contains(err.Error(), "permission denied") {
		t.Fatalf("denied client: %v", err)
	}
}

// ------------------------------------------------------------ cross-process

const ringHelperEnv = "ARS_RING_HELPER"

// TestRingHelperProcess is not a test: re-executed with ARS_RING_HELPER
// set, it serves a ring at ARS_RING_PATH. Modes: "close N" writes N
// records and closes cleanly; "die N" writes N records, flushes and
// SIGKILLs itself; "bench N" writes N 64-byte records as fast as it can;
// "lat N" writes N timestamped records, one at a time (each once the
// previous one is consumed); "latb N [US]" the same with a pause of US
// µs (default 200) before each record, so a blocking consumer is asleep.
func TestRingHelperProcess(t *testing.T) {
	mode := os.Getenv(ringHelperEnv)
	if mode == "" {
		return
	}
	var kind string
	var n, pauseUS int
	fmt.Sscanf(mode, "%s %d %d", &kind, &n, &pauseUS)
	if pauseUS <= 0 {
		pauseUS = 200
	}
	path := os.Getenv("ARS_RING_PATH")
	if cpu := os.Getenv("ARS_RING_HELPER_CPU"); cpu != "" {
		var n int
		fmt.Sscanf(cpu, "%d", &n)
		pinProcess(n)
	}
	s := NewRingServer(path, func(Peer, string) error { return nil }, RingConfig{Capacity: 64 * 4096, RecordSize: 64}, slog.Default())
	if err := s.Listen(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s.Serve(ctx, func(_ context.Context, _ Peer, p *Producer) {
		defer cancel()
		if kind == "socket" {
			return
		}
		rec := make([]byte, 64)
		for i := 0; i < n; i++ {
			binary.LittleEndian.PutUint64(rec, uint64(i))
			if kind == "lat" || kind == "latb" {
				if kind == "latb" { // let the consumer fall asleep
					time.Sleep(time.Duration(pauseUS) * time.Microsecond)
				}
				binary.LittleEndian.PutUint64(rec[8:], uint64(time.Now().UnixNano()))
				if err := p.WriteRecord(rec); err != nil {
					os.Exit(3)
				}
				p.Flush()
				for n := 1; atomic.LoadUint64(p.u64(offTail)) != p.head; n++ {
					if n&255 == 0 {
						cpuYield() // the consumer may be queued on this CPU
					} else {
						spinPause()
					}
				}
				continue
			}
			if err := p.WriteRecord(rec); err != nil {
				fmt.Fprintln(os.Stderr, "helper write:", err)
				os.Exit(3)
			}
		}
		p.Flush()
		if kind == "die" {
			syscall.Kill(os.Getpid(), syscall.SIGKILL)
			select {}
		}
	})
	os.Exit(0)
}

// startHelper re-executes the test binary as a ring producer and dials it.
func startHelper(t testing.TB, mode string, cfg RingConfig) (*Consumer, *exec.Cmd) {
	return startHelperOn(t, mode, cfg, -1)
}

// startHelperOn is startHelper with the helper pinned to helperCPU (≥ 0).
func startHelperOn(t testing.TB, mode string, cfg RingConfig, helperCPU int) (*Consumer, *exec.Cmd) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "h", "ring.sock")
	cmd := exec.Command(os.Args[0], "-test.run=^TestRingHelperProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), ringHelperEnv+"="+mode, "ARS_RING_PATH="+path)
	if helperCPU >= 0 {
		cmd.Env = append(cmd.Env, fmt.Sprintf("ARS_RING_HELPER_CPU=%d", helperCPU))
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, _, err := DialRing(context.Background(), path, nil, cfg)
		if err == nil {
			return c, cmd
		}
		if time.Now().After(deadline) {
			t.Fatalf("dial helper: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestRingCrossProcess(t *testing.T) {
	const n = 300000
	c, cmd := startHelper(t, fmt.Sprintf("close %d", n), RingConfig{})
	defer c.Close()
	buf := make([]byte, 64)
	for i := 0; i < n; i++ {
		if err := c.ReadRecord(buf); err != nil {
			t.Fatalf("record %d: %v", i, err)
		}
		if got := binary.LittleEndian.Uint64(buf); got != uint64(i) {
			t.Fatalf("record %d has seq %d", i, got)
		}
	}
	if err := c.ReadRecord(buf); !errors.Is(err, io.EOF) {
		t.Fatalf("after clean close: %v, want EOF", err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("helper: %v", err)
	}
}

func TestRingProducerDeath(t *testing.T) {
	const n = 1000
	c, cmd := startHelper(t, fmt.Sprintf("die %d", n), RingConfig{Spin: 100})
	defer c.Close()
	cmd.Wait() // killed after publishing n records
	buf := make([]byte, 64)
	for i := 0; i < n; i++ {
		if err := c.ReadRecord(buf); err != nil {
			t.Fatalf("record %d of a dead producer's ring: %v", i, err)
		}
	}
	start := time.Now()
	if err := c.ReadRecord(buf); !errors.Is(err, ErrPeerGone) {
		t.Fatalf("drained ring of a dead producer: %v, want ErrPeerGone", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("death noticed after %v", d)
	}
}

func TestRingConsumerDeath(t *testing.T) {
	// In-process producer, consumer in a helper that attaches then exits
	// ("socket" mode on our side: we dial ourselves from a child).
	path := filepath.Join(t.TempDir(), "c", "ring.sock")
	s := NewRingServer(path, func(Peer, string) error { return nil }, RingConfig{Capacity: 64 * 64, RecordSize: 64}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err := s.Listen(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	res := make(chan error, 1)
	go s.Serve(ctx, func(_ context.Context, _ Peer, p *Producer) {
		rec := make([]byte, 64)
		for {
			if err := p.WriteRecord(rec); err != nil {
				res <- err
				return
			}
		}
	})
	cmd := exec.Command(os.Args[0], "-test.run=^TestRingConsumerHelper$", "-test.count=1")
	cmd.Env = append(os.Environ(), "ARS_RING_CONSUMER="+path)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("consumer helper: %v %s", err, out)
	}
	select {
	case err := <-res:
		if !errors.Is(err, ErrPeerGone) {
			t.Fatalf("write to a dead consumer: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("producer did not notice the consumer's death")
	}
}

// TestRingConsumerHelper is not a test: with ARS_RING_CONSUMER set it
// attaches, reads one record and exits without closing anything.
func TestRingConsumerHelper(t *testing.T) {
	path := os.Getenv("ARS_RING_CONSUMER")
	if path == "" {
		return
	}
	c, _, err := DialRing(context.Background(), path, nil, RingConfig{})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	c.ReadRecord(make([]byte, 64))
	os.Exit(0)
}

// pinProcess sets the affinity of every thread of this process to cpu
// (threads created later inherit it) and returns a function undoing it.
func pinProcess(cpu int) (restore func()) {
	var all, one unix.CPUSet
	unix.SchedGetaffinity(0, &all)
	one.Set(cpu)
	set := func(s *unix.CPUSet) {
		ents, _ := os.ReadDir("/proc/self/task")
		for _, e := range ents {
			var tid int
			fmt.Sscanf(e.Name(), "%d", &tid)
			unix.SchedSetaffinity(tid, s)
		}
	}
	set(&one)
	return func() { set(&all) }
}

func unsafePtr(b []byte, off int) unsafe.Pointer { return unsafe.Pointer(&b[off]) }
