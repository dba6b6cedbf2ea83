package ipc

// Shared-memory ring: a sealed memfd mapped by one producer and one
// consumer (see BRIEF.md, IPC). Layout, all native-endian (both sides run
// on the same host):
//
//	0     magic   u64  "ARSRING\0"
//	8     version u32
//	12    flags   u32  (RingFlagFrames: length-prefixed frames)
//	16    capacity u64 (bytes of the data area)
//	24    record size u32 (0 in frames mode)
//	28    data offset u32 (= ringHeaderSize)
//	128   head  u64  (producer's published write position, bytes, monotonic)
//	256   tail  u64  (consumer's published read position)
//	384   sleeping u32 (consumer is, or is about to be, blocked on the eventfd)
//	512   closed u32   (producer closed the ring cleanly)
//	4096  data
//
// head, tail and the flags each sit on their own 128-byte block (two cache
// lines, against adjacent-line prefetch). Each side keeps its own position
// privately and only publishes it; everything read back from the mapping
// (the other side's position, frame lengths) is bounds-checked before use,
// so a hostile peer can make a call fail with ErrRingCorrupt but cannot
// make it panic or read outside the data area.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

const (
	ringMagic      = uint64(0x00474e4952535241) // "ARSRING\0" little-endian
	RingVersion    = 1
	ringHeaderSize = 4096

	// RingFlagFrames marks a ring carrying length-prefixed frames.
	RingFlagFrames = 1

	offMagic    = 0
	offVersion  = 8
	offFlags    = 12
	offCapacity = 16
	offRecSize  = 24
	offDataOff  = 28
	offHead     = 128
	offTail     = 256
	offSleeping = 384
	offClosed   = 512

	frameSkip  = 0xFFFFFFFF // length word meaning "jump to the start of the data area"
	frameAlign = 8

	// RequiredSeals must all be set on a ring's memfd; Attach refuses it otherwise.
	RequiredSeals = unix.F_SEAL_SHRINK | unix.F_SEAL_GROW | unix.F_SEAL_SEAL

	maxRingCapacity = 1 << 30
	maxRecordSize   = 1 << 16
)

var (
	// ErrRingCorrupt: the shared memory holds something impossible (bad
	// header, index out of range, bad frame length).
	ErrRingCorrupt = errors.New("ipc: ring corrupt")
	// ErrPeerGone: the other side died (process exit or socket closed) and,
	// for a reader, everything it published has been read.
	ErrPeerGone = errors.New("ipc: ring peer gone")
	// ErrRingClosed: this end was closed.
	ErrRingClosed = errors.New("ipc: ring closed")
	// ErrWouldBlock: a Try call found nothing to read / no room to write.
	ErrWouldBlock = errors.New("ipc: ring would block")
)

// RingParams describe a ring; the handshake sends them and Attach checks
// the header against them.
type RingParams struct {
	Version    int `json:"version"`
	Capacity   int `json:"capacity"`    // bytes of data area
	RecordSize int `json:"record_size"` // > 0: fixed-size records; 0: frames
}

// RingConfig configures a new producer ring and the waiting policy of a
// consumer.
type RingConfig struct {
	Capacity   int // data bytes; frames: power of two ≥ 4096; records: multiple of RecordSize
	RecordSize int // > 0 fixed-size records, 0 frames
	Batch      int // publish the index every Batch records (default 64); Flush publishes now
	Spin       int // consumer: empty polls before sleeping on the eventfd (default 4096); < 0 never sleeps
}

func (c *RingConfig) defaults() {
	if c.Batch <= 0 {
		c.Batch = 64
	}
	if c.Spin == 0 {
		c.Spin = 4096
	}
}

func validParams(p RingParams) error {
	if p.Capacity <= 0 || p.Capacity > maxRingCapacity {
		return fmt.Errorf("capacity %d out of range (1..%d)", p.Capacity, maxRingCapacity)
	}
	if p.RecordSize < 0 || p.RecordSize > maxRecordSize {
		return fmt.Errorf("record size %d out of range (0..%d)", p.RecordSize, maxRecordSize)
	}
	if p.RecordSize == 0 {
		if p.Capacity < 4096 || p.Capacity&(p.Capacity-1) != 0 {
			return fmt.Errorf("frames ring capacity %d must be a power of two ≥ 4096", p.Capacity)
		}
	} else if p.Capacity%p.RecordSize != 0 {
		return fmt.Errorf("capacity %d is not a multiple of record size %d", p.Capacity, p.RecordSize)
	}
	return nil
}

// ring is the state shared by both ends.
type ring struct {
	mem      []byte
	data     []byte
	capacity uint64
	recSize  uint64
	frames   bool
	memfd    int
	efd      int
	spin     int
	watch    []int  // fds whose readiness means the peer is gone (pidfd, socket)
	watchPid []bool // watch[i] is a pidfd (readable = exited); else a socket (hang-up = gone)
	closed   atomic.Bool
}

func (r *ring) u64(off int) *uint64 { return (*uint64)(unsafe.Pointer(&r.mem[off])) }
func (r *ring) u32(off int) *uint32 { return (*uint32)(unsafe.Pointer(&r.mem[off])) }

// maxFramePayload is the largest frame this ring can carry.
func (r *ring) maxFramePayload() uint64 {
	m := r.capacity/2 - frameAlign
	if m > MaxFrame {
		m = MaxFrame
	}
	return m
}

func (r *ring) release() {
	if r.mem != nil {
		unix.Munmap(r.mem)
		r.mem, r.data = nil, nil
	}
	for _, fd := range append([]int{r.memfd, r.efd}, r.watch...) {
		if fd >= 0 {
			unix.Close(fd)
		}
	}
	r.memfd, r.efd, r.watch, r.watchPid = -1, -1, nil, nil
}

// watchPollFds appends the watch fds to pfds. A socket is polled for
// hang-up only: data the peer sends on it (a control protocol after the
// handshake) must not look like readiness, or a sleeping reader would spin.
func (r *ring) watchPollFds(pfds []unix.PollFd) []unix.PollFd {
	for i, fd := range r.watch {
		ev := int16(unix.POLLRDHUP)
		if r.watchPid[i] {
			ev = unix.POLLIN
		}
		pfds = append(pfds, unix.PollFd{Fd: int32(fd), Events: ev})
	}
	return pfds
}

// peerGone polls the watch fds without blocking.
func (r *ring) peerGone() bool {
	if len(r.watch) == 0 {
		return false
	}
	return r.pollGone(r.watchPollFds(nil), 0)
}

// pollGone polls pfds (watch fds, optionally preceded by others) and says
// whether a watch fd reported the peer's death.
func (r *ring) pollGone(pfds []unix.PollFd, timeoutMs int) bool {
	for {
		_, err := unix.Poll(pfds, timeoutMs)
		if err == unix.EINTR {
			continue
		}
		break
	}
	first := len(pfds) - len(r.watch)
	for i := first; i < len(pfds); i++ {
		re := pfds[i].Revents
		// A pidfd turns readable when the process exits; the socket
		// reports RDHUP/HUP when the peer closes (it is polled for
		// hang-up only, so a protocol on it after the handshake, like
		// the collector's requests, does not count).
		if re&(unix.POLLHUP|unix.POLLRDHUP|unix.POLLERR|unix.POLLNVAL) != 0 {
			return true
		}
		if re&unix.POLLIN != 0 && r.watchPid[i-first] {
			return true
		}
	}
	return false
}

// AddPeerWatch hands the ring an fd whose readiness means the peer is gone
// (a pidfd, or the handshake socket). The ring owns and closes it.
func (r *ring) AddPeerWatch(fd int) {
	r.watch = append(r.watch, fd)
	r.watchPid = append(r.watchPid, fdIs(fd, "anon_inode:[pidfd]"))
}

// PeerGone says, without blocking, whether a watched peer has died or
// hung up (always false without watches).
func (r *ring) PeerGone() bool {
	if r.mem == nil {
		return true
	}
	return r.peerGone()
}

// ---------------------------------------------------------------- producer

// Producer is the writing end. Not safe for concurrent use.
type Producer struct {
	ring
	head       uint64 // private write position
	published  uint64
	cachedTail uint64
	off        uint64 // records mode: head's offset in data
	pending    int
	batch      int
}

// NewProducer creates a sealed memfd ring and its eventfd.
func NewProducer(cfg RingConfig) (*Producer, error) {
	cfg.defaults()
	p := RingParams{Version: RingVersion, Capacity: cfg.Capacity, RecordSize: cfg.RecordSize}
	if err := validParams(p); err != nil {
		return nil, fmt.Errorf("ipc: new ring: %w", err)
	}
	pr := &Producer{ring: ring{memfd: -1, efd: -1, spin: cfg.Spin}, batch: cfg.Batch}
	fail := func(what string, err error) (*Producer, error) {
		pr.release()
		return nil, fmt.Errorf("ipc: new ring: %s: %w", what, err)
	}
	fd, err := unix.MemfdCreate("ars-ring", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return fail("memfd_create", err)
	}
	pr.memfd = fd
	size := ringHeaderSize + cfg.Capacity
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		return fail("ftruncate", err)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, RequiredSeals); err != nil {
		return fail("seal", err)
	}
	if pr.efd, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK); err != nil {
		return fail("eventfd", err)
	}
	if pr.mem, err = unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED); err != nil {
		return fail("mmap", err)
	}
	pr.data = pr.mem[ringHeaderSize:]
	pr.capacity = uint64(cfg.Capacity)
	pr.recSize = uint64(cfg.RecordSize)
	pr.frames = cfg.RecordSize == 0
	le := binary.LittleEndian
	le.PutUint64(pr.mem[offMagic:], ringMagic)
	le.PutUint32(pr.mem[offVersion:], RingVersion)
	if pr.frames {
		le.PutUint32(pr.mem[offFlags:], RingFlagFrames)
	}
	le.PutUint64(pr.mem[offCapacity:], uint64(cfg.Capacity))
	le.PutUint32(pr.mem[offRecSize:], uint32(cfg.RecordSize))
	le.PutUint32(pr.mem[offDataOff:], ringHeaderSize)
	return pr, nil
}

// Params returns what a consumer needs to attach.
func (p *Producer) Params() RingParams {
	return RingParams{Version: RingVersion, Capacity: int(p.capacity), RecordSize: int(p.recSize)}
}

// FDs returns the memfd and eventfd (still owned by the producer).
func (p *Producer) FDs() (memfd, eventfd int) { return p.memfd, p.efd }

// Flush publishes everything written so far and wakes a sleeping consumer.
func (p *Producer) Flush() {
	if p.published == p.head || p.mem == nil {
		return
	}
	atomic.StoreUint64(p.u64(offHead), p.head)
	p.published = p.head
	p.pending = 0
	// Dekker with the consumer: it stores sleeping=1 then re-reads head;
	// we store head then read sleeping. Go atomics are sequentially
	// consistent, so one of us sees the other.
	if atomic.LoadUint32(p.u32(offSleeping)) != 0 && atomic.CompareAndSwapUint32(p.u32(offSleeping), 1, 0) {
		p.signal()
	}
}

func (p *Producer) signal() {
	var one [8]byte
	binary.NativeEndian.PutUint64(one[:], 1)
	unix.Write(p.efd, one[:]) // EAGAIN only if the counter is saturated: a wakeup is pending anyway
}

// free makes sure need bytes are free, waiting for the consumer.
func (p *Producer) free(need uint64, block bool) error {
	if p.closed.Load() || p.mem == nil {
		return ErrRingClosed
	}
	if p.capacity-(p.head-p.cachedTail) >= need {
		return nil
	}
	p.Flush() // the consumer may be waiting for what we hold back
	var since time.Time
	for i := 0; ; i++ {
		t := atomic.LoadUint64(p.u64(offTail))
		if t > p.head || p.head-t > p.capacity {
			return fmt.Errorf("%w: tail %d, head %d, capacity %d", ErrRingCorrupt, t, p.head, p.capacity)
		}
		p.cachedTail = t
		if p.capacity-(p.head-t) >= need {
			return nil
		}
		if !block {
			return ErrWouldBlock
		}
		if p.closed.Load() {
			return ErrRingClosed
		}
		// Spin, then yield for up to 200 µs (a consumer at full speed
		// frees room within microseconds), then back off up to 1 ms: a
		// ring full for that long means a slow or stuck consumer (there
		// is no consumer→producer wakeup yet).
		switch {
		case i < 256:
			spinPause()
			continue
		case i == 256:
			since = time.Now()
		}
		wait := time.Since(since)
		if wait < 200*time.Microsecond {
			runtime.Gosched()
			if i&15 == 0 {
				cpuYield() // the consumer may be waiting for this very CPU
			}
			continue
		}
		if i%16 == 0 && p.peerGone() {
			return ErrPeerGone
		}
		d := wait / 8
		if d > time.Millisecond {
			d = time.Millisecond
		}
		time.Sleep(d)
	}
}

func (p *Producer) advance(n uint64) {
	p.head += n
	p.pending++
	if p.pending >= p.batch {
		p.Flush()
	}
}

// WriteRecord copies one fixed-size record in, waiting while the ring is
// full. The index is published every Batch records or on Flush.
func (p *Producer) WriteRecord(rec []byte) error { return p.writeRecord(rec, true) }

// TryWriteRecord is WriteRecord returning ErrWouldBlock when full.
func (p *Producer) TryWriteRecord(rec []byte) error { return p.writeRecord(rec, false) }

func (p *Producer) writeRecord(rec []byte, block bool) error {
	if p.frames {
		return errors.New("ipc: WriteRecord on a frames ring")
	}
	if uint64(len(rec)) != p.recSize {
		return fmt.Errorf("ipc: record of %d bytes, ring record size %d", len(rec), p.recSize)
	}
	if err := p.free(p.recSize, block); err != nil {
		return err
	}
	copy(p.data[p.off:p.off+p.recSize], rec)
	p.off += p.recSize
	if p.off == p.capacity {
		p.off = 0
	}
	p.advance(p.recSize)
	return nil
}

// WriteFrame copies one length-prefixed frame in (frames ring), waiting
// while the ring is full. A frame never wraps: if it does not fit before
// the end of the data area, a skip marker sends the reader to the start.
func (p *Producer) WriteFrame(payload []byte) error { return p.writeFrame(payload, true) }

// TryWriteFrame is WriteFrame returning ErrWouldBlock when full.
func (p *Producer) TryWriteFrame(payload []byte) error { return p.writeFrame(payload, false) }

func (p *Producer) writeFrame(payload []byte, block bool) error {
	if !p.frames {
		return errors.New("ipc: WriteFrame on a records ring")
	}
	n := uint64(len(payload))
	if n > p.maxFramePayload() {
		return fmt.Errorf("%w: %d bytes, this ring carries at most %d", ErrFrameTooLarge, n, p.maxFramePayload())
	}
	need := alignUp(4 + n)
	off := p.head & (p.capacity - 1)
	contig := p.capacity - off
	total := need
	if need > contig {
		total += contig
	}
	if err := p.free(total, block); err != nil {
		return err
	}
	if need > contig {
		binary.NativeEndian.PutUint32(p.data[off:], frameSkip)
		p.head += contig
		off = 0
	}
	binary.NativeEndian.PutUint32(p.data[off:], uint32(n))
	copy(p.data[off+4:off+4+n], payload)
	p.advance(need)
	return nil
}

func alignUp(n uint64) uint64 { return (n + frameAlign - 1) &^ (frameAlign - 1) }

// Close publishes what is pending, marks the ring closed (the consumer
// drains it and then gets io.EOF), and releases the mapping and fds.
func (p *Producer) Close() error {
	if p.closed.Swap(true) {
		return nil
	}
	if p.mem != nil {
		p.Flush()
		atomic.StoreUint32(p.u32(offClosed), 1)
		p.signal()
	}
	p.release()
	return nil
}

// ---------------------------------------------------------------- consumer

// Consumer is the reading end. Not safe for concurrent use, except Close.
type Consumer struct {
	ring
	tail       uint64 // private read position
	published  uint64
	cachedHead uint64
	off        uint64 // records mode: tail's offset in data
	pending    int
	batch      int
}

// Attach maps a ring received from a producer. It takes ownership of memfd
// and eventfd (closed on error too). want, if non-zero, must match the
// header. The memfd must carry RequiredSeals and be exactly as large as
// the header says.
func Attach(memfd, eventfd int, want RingParams, cfg RingConfig) (*Consumer, error) {
	cfg.defaults()
	c := &Consumer{ring: ring{memfd: memfd, efd: eventfd, spin: cfg.Spin}, batch: cfg.Batch}
	fail := func(err error) (*Consumer, error) {
		c.release()
		return nil, fmt.Errorf("ipc: attach ring: %w", err)
	}
	seals, err := unix.FcntlInt(uintptr(memfd), unix.F_GET_SEALS, 0)
	if err != nil {
		return fail(fmt.Errorf("not a sealable memfd: %w", err))
	}
	if seals&RequiredSeals != RequiredSeals {
		return fail(fmt.Errorf("memfd seals %#x lack shrink|grow|seal (%#x): it could be resized under us", seals, RequiredSeals))
	}
	var st unix.Stat_t
	if err := unix.Fstat(memfd, &st); err != nil {
		return fail(err)
	}
	if st.Size < ringHeaderSize || st.Size > ringHeaderSize+maxRingCapacity {
		return fail(fmt.Errorf("memfd size %d out of range", st.Size))
	}
	if c.mem, err = unix.Mmap(memfd, 0, int(st.Size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED); err != nil {
		return fail(fmt.Errorf("mmap: %w", err))
	}
	h, err := parseHeader(c.mem)
	if err != nil {
		return fail(err)
	}
	if want != (RingParams{}) && want != h {
		return fail(fmt.Errorf("header %+v does not match announced %+v", h, want))
	}
	if int64(ringHeaderSize+h.Capacity) != st.Size {
		return fail(fmt.Errorf("header capacity %d does not match memfd size %d", h.Capacity, st.Size))
	}
	c.capacity, c.recSize, c.frames = uint64(h.Capacity), uint64(h.RecordSize), h.RecordSize == 0
	c.data = c.mem[ringHeaderSize:]
	// Start where the producer is now: what it published before we came
	// is readable, and must be consistent with its own tail.
	c.tail = atomic.LoadUint64(c.u64(offTail))
	if hd := atomic.LoadUint64(c.u64(offHead)); hd < c.tail || hd-c.tail > c.capacity {
		return fail(fmt.Errorf("%w: head %d tail %d", ErrRingCorrupt, hd, c.tail))
	}
	if c.frames {
		if c.tail%frameAlign != 0 {
			return fail(fmt.Errorf("%w: unaligned tail %d", ErrRingCorrupt, c.tail))
		}
	} else {
		if c.tail%c.recSize != 0 {
			return fail(fmt.Errorf("%w: tail %d not on a record", ErrRingCorrupt, c.tail))
		}
		c.off = c.tail % c.capacity
	}
	c.published, c.cachedHead = c.tail, c.tail
	return c, nil
}

func parseHeader(mem []byte) (RingParams, error) {
	le := binary.LittleEndian
	if len(mem) < ringHeaderSize {
		return RingParams{}, errors.New("mapping smaller than the header")
	}
	if m := le.Uint64(mem[offMagic:]); m != ringMagic {
		return RingParams{}, fmt.Errorf("%w: bad magic %#x", ErrRingCorrupt, m)
	}
	if v := le.Uint32(mem[offVersion:]); v != RingVersion {
		return RingParams{}, fmt.Errorf("ring version %d, this build speaks %d", v, RingVersion)
	}
	if d := le.Uint32(mem[offDataOff:]); d != ringHeaderSize {
		return RingParams{}, fmt.Errorf("%w: data offset %d", ErrRingCorrupt, d)
	}
	flags := le.Uint32(mem[offFlags:])
	capa := le.Uint64(mem[offCapacity:])
	rs := le.Uint32(mem[offRecSize:])
	if flags&^RingFlagFrames != 0 {
		return RingParams{}, fmt.Errorf("unknown ring flags %#x", flags)
	}
	if (flags&RingFlagFrames != 0) != (rs == 0) {
		return RingParams{}, fmt.Errorf("%w: flags %#x disagree with record size %d", ErrRingCorrupt, flags, rs)
	}
	if capa > maxRingCapacity {
		return RingParams{}, fmt.Errorf("%w: capacity %d", ErrRingCorrupt, capa)
	}
	p := RingParams{Version: RingVersion, Capacity: int(capa), RecordSize: int(rs)}
	if err := validParams(p); err != nil {
		return RingParams{}, fmt.Errorf("%w: %v", ErrRingCorrupt, err)
	}
	return p, nil
}

// Params returns the ring's parameters.
func (c *Consumer) Params() RingParams {
	return RingParams{Version: RingVersion, Capacity: int(c.capacity), RecordSize: int(c.recSize)}
}

// avail returns the number of published, unread bytes, checking the
// producer's head.
func (c *Consumer) avail() (uint64, error) {
	if c.cachedHead != c.tail {
		return c.cachedHead - c.tail, nil
	}
	h := atomic.LoadUint64(c.u64(offHead))
	if h < c.tail || h-c.tail > c.capacity {
		return 0, fmt.Errorf("%w: head %d, tail %d, capacity %d", ErrRingCorrupt, h, c.tail, c.capacity)
	}
	c.cachedHead = h
	return h - c.tail, nil
}

func (c *Consumer) publishTail() {
	if c.published != c.tail {
		atomic.StoreUint64(c.u64(offTail), c.tail)
		c.published = c.tail
	}
	c.pending = 0
}

func (c *Consumer) consumed(n uint64) {
	c.tail += n
	c.pending++
	if c.pending >= c.batch {
		c.publishTail()
	}
}

// wait blocks until at least one byte is published. It spins Spin times,
// then declares itself asleep in the header and blocks on the eventfd (and
// the peer-death fds). Returns io.EOF once a closed ring is drained and
// ErrPeerGone once a dead producer's ring is drained.
func (c *Consumer) wait(block bool) error {
	c.publishTail() // let a blocked producer go on
	for i := 0; ; i++ {
		if c.closed.Load() || c.mem == nil {
			return ErrRingClosed
		}
		a, err := c.avail()
		if err != nil || a > 0 {
			return err
		}
		if atomic.LoadUint32(c.u32(offClosed)) != 0 {
			// Re-read head: it was published before closed.
			if a, err := c.avail(); err != nil || a > 0 {
				return err
			}
			return io.EOF
		}
		if !block {
			return ErrWouldBlock
		}
		if c.spin < 0 || i < c.spin {
			switch {
			case i&1023 == 1023:
				// Let the producer have this CPU if the scheduler put it
				// here: with a non-preemptive kernel it would otherwise
				// wait for our time slice to end (milliseconds).
				cpuYield()
			case i&63 == 63:
				runtime.Gosched()
			default:
				spinPause()
			}
			continue
		}
		atomic.StoreUint32(c.u32(offSleeping), 1)
		if a, err := c.avail(); err != nil || a > 0 || atomic.LoadUint32(c.u32(offClosed)) != 0 {
			atomic.StoreUint32(c.u32(offSleeping), 0)
			i = 0
			continue
		}
		pfds := make([]unix.PollFd, 0, 1+len(c.watch))
		pfds = append(pfds, unix.PollFd{Fd: int32(c.efd), Events: unix.POLLIN})
		pfds = c.watchPollFds(pfds)
		// The timeout only bounds how long Close from another goroutine
		// takes to be noticed; an idle consumer wakes 4 times a second.
		gone := c.pollGone(pfds, 250)
		var buf [8]byte
		unix.Read(c.efd, buf[:])
		atomic.StoreUint32(c.u32(offSleeping), 0)
		if gone {
			// The producer may have published before dying: drain first.
			if a, err := c.avail(); err != nil || a > 0 {
				return err
			}
			if atomic.LoadUint32(c.u32(offClosed)) != 0 {
				return io.EOF
			}
			return ErrPeerGone
		}
		i = 0
	}
}

// ReadRecord copies the next record into dst (len ≥ record size), waiting
// for one. io.EOF after a clean close, ErrPeerGone after the producer died,
// both only once everything published has been read.
func (c *Consumer) ReadRecord(dst []byte) error { return c.readRecord(dst, true) }

// TryReadRecord is ReadRecord returning ErrWouldBlock when empty.
func (c *Consumer) TryReadRecord(dst []byte) error { return c.readRecord(dst, false) }

func (c *Consumer) readRecord(dst []byte, block bool) error {
	if c.frames {
		return errors.New("ipc: ReadRecord on a frames ring")
	}
	if uint64(len(dst)) < c.recSize {
		return fmt.Errorf("ipc: buffer of %d bytes for %d-byte records", len(dst), c.recSize)
	}
	for {
		a, err := c.avail()
		if err != nil {
			return err
		}
		if a >= c.recSize {
			break
		}
		if a != 0 {
			return fmt.Errorf("%w: %d bytes published, less than one record", ErrRingCorrupt, a)
		}
		if err := c.wait(block); err != nil {
			return err
		}
	}
	if c.off+c.recSize > uint64(len(c.data)) { // cannot happen with a validated header
		return fmt.Errorf("%w: record offset %d", ErrRingCorrupt, c.off)
	}
	copy(dst, c.data[c.off:c.off+c.recSize])
	c.off += c.recSize
	if c.off == c.capacity {
		c.off = 0
	}
	c.consumed(c.recSize)
	return nil
}

// ReadFrame returns the next frame (a fresh copy), waiting for one.
func (c *Consumer) ReadFrame() ([]byte, error) { return c.readFrame(nil, true) }

// TryReadFrame is ReadFrame returning ErrWouldBlock when empty.
func (c *Consumer) TryReadFrame() ([]byte, error) { return c.readFrame(nil, false) }

// ReadFrameAppend appends the next frame to buf and returns it.
func (c *Consumer) ReadFrameAppend(buf []byte) ([]byte, error) { return c.readFrame(buf, true) }

func (c *Consumer) readFrame(buf []byte, block bool) ([]byte, error) {
	if !c.frames {
		return nil, errors.New("ipc: ReadFrame on a records ring")
	}
	for {
		a, err := c.avail()
		if err != nil {
			return nil, err
		}
		if a == 0 {
			if err := c.wait(block); err != nil {
				return nil, err
			}
			continue
		}
		out, n, err := decodeFrame(c.data, c.tail, a, c.maxFramePayload(), buf)
		if err != nil {
			return nil, err
		}
		if out == nil { // skip marker
			c.tail += n
			continue
		}
		c.consumed(n)
		return out, nil
	}
}

// decodeFrame decodes the frame at position pos of data (len a power of
// two) with avail bytes published. It returns the payload appended to buf
// (nil for a skip marker) and how far to advance. Every value read from
// data is checked; data may be changed concurrently by a hostile peer.
func decodeFrame(data []byte, pos, avail, maxPayload uint64, buf []byte) ([]byte, uint64, error) {
	capa := uint64(len(data))
	off := pos & (capa - 1)
	if avail < 4 || off+4 > capa {
		return nil, 0, fmt.Errorf("%w: %d bytes published at offset %d, no room for a frame header", ErrRingCorrupt, avail, off)
	}
	l := uint64(binary.NativeEndian.Uint32(data[off:]))
	if l == frameSkip {
		skip := capa - off
		if skip > avail {
			return nil, 0, fmt.Errorf("%w: skip marker past the published data", ErrRingCorrupt)
		}
		if off == 0 {
			return nil, 0, fmt.Errorf("%w: skip marker at the start of the data area", ErrRingCorrupt)
		}
		return nil, skip, nil
	}
	if l > maxPayload {
		return nil, 0, fmt.Errorf("%w: frame length %d over %d", ErrRingCorrupt, l, maxPayload)
	}
	need := alignUp(4 + l)
	if off+need > capa || need > avail {
		return nil, 0, fmt.Errorf("%w: frame of %d bytes at offset %d overruns (published %d)", ErrRingCorrupt, l, off, avail)
	}
	if buf == nil {
		buf = make([]byte, 0, l)
	}
	return append(buf, data[off+4:off+4+l]...), need, nil
}

// Interrupt makes a blocked or future read return ErrRingClosed (within
// 250 ms for a sleeping reader). Safe from any goroutine.
func (c *Consumer) Interrupt() { c.closed.Store(true) }

// Close unmaps and closes the fds. Call it from the reading goroutine (or
// after Interrupt and the read has returned).
func (c *Consumer) Close() error {
	c.closed.Store(true)
	c.release()
	return nil
}

// cpuYield gives the CPU to another runnable task on it (sched_yield):
// runtime.Gosched only yields to goroutines of this process, not to the
// peer process the scheduler may have put on the same CPU.
func cpuYield() { unix.Syscall(unix.SYS_SCHED_YIELD, 0, 0, 0) }

//go:noinline
func spinPause() {
	for i := 0; i < 16; i++ {
	}
}
