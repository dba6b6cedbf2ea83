package tc

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	"math"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/ars-dev/ars/internal/testutil"
)

// The test network: two fresh namespaces joined by a veth pair. "host"
// holds tapLink (standing in for the VM's tap), "vm" holds its peer.
// Addresses are link-local; nothing leaves the namespaces.
const (
	tapLink = "tap0"
	vmLink  = "eth0"
	hostIP  = "169.254.77.1"
	vmIP    = "169.254.77.2"
)

// Per-packet overhead HTB counts that TCP payload does not carry, for a
// 1500-byte MTU with TCP timestamps: 14 Ethernet + 20 IP + 32 TCP on a
// 1448-byte segment. Goodput = rate * goodputShare.
const goodputShare = 1448.0 / 1514.0

type testNet struct {
	host, vm netns.NsHandle
}

// inNS runs fn on a thread switched into ns. Sockets created by fn stay in
// ns for their whole life, whichever thread later uses them.
func inNS(ns netns.NsHandle, fn func() error) error {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer orig.Close()
	if err := netns.Set(ns); err != nil {
		runtime.UnlockOSThread()
		return err
	}
	ferr := fn()
	if err := netns.Set(orig); err != nil {
		// Leave the thread locked: it exits with this goroutine.
		return errors.Join(ferr, err)
	}
	runtime.UnlockOSThread()
	return ferr
}

// createNS makes a named namespace (NewNamed moves the calling thread into
// it) and moves the thread back.
func createNS(name string) (netns.NsHandle, error) {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return netns.None(), err
	}
	defer orig.Close()
	ns, err := netns.NewNamed(name)
	if serr := netns.Set(orig); serr != nil {
		// Leave the thread locked: it exits with this goroutine.
		if err == nil {
			ns.Close()
			_ = netns.DeleteNamed(name)
		}
		return netns.None(), errors.Join(err, serr)
	}
	runtime.UnlockOSThread()
	return ns, err
}

func newNamedNS(t testing.TB) netns.NsHandle {
	t.Helper()
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	name := "ars-tc-" + hex.EncodeToString(b)
	ns, err := createNS(name)
	if err != nil {
		t.Fatalf("create netns %s: %v", name, err)
	}
	t.Cleanup(func() {
		ns.Close()
		if err := netns.DeleteNamed(name); err != nil {
			t.Errorf("delete netns %s: %v", name, err)
		}
	})
	return ns
}

func newTestNet(t testing.TB) *testNet {
	t.Helper()
	testutil.RequirePrivileged(t)
	tn := &testNet{host: newNamedNS(t), vm: newNamedNS(t)}
	hh, err := netlink.NewHandleAt(tn.host)
	if err != nil {
		t.Fatal(err)
	}
	defer hh.Close()
	vh, err := netlink.NewHandleAt(tn.vm)
	if err != nil {
		t.Fatal(err)
	}
	defer vh.Close()
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: tapLink, TxQLen: 1000},
		PeerName:      vmLink,
		PeerNamespace: netlink.NsFd(tn.vm),
	}
	if err := hh.LinkAdd(veth); err != nil {
		t.Fatalf("veth: %v", err)
	}
	up := func(h *netlink.Handle, name, ip string) {
		l, err := h.LinkByName(name)
		if err != nil {
			t.Fatal(err)
		}
		a, _ := netlink.ParseAddr(ip + "/24")
		if err := h.AddrAdd(l, a); err != nil {
			t.Fatal(err)
		}
		if err := h.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
	}
	up(hh, tapLink, hostIP)
	up(vh, vmLink, vmIP)
	return tn
}

func newShaper(t testing.TB, ns netns.NsHandle) *Netlink {
	t.Helper()
	s, err := New(ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

// flow is one long-running TCP stream from sender to receiver namespace.
type flow struct {
	received atomic.Int64
	accepts  atomic.Int32
	stopping atomic.Bool
	mu       sync.Mutex
	err      error // first error before stop
	wg       sync.WaitGroup
	ln       net.Listener
	c, s     net.Conn
}

func (f *flow) fail(err error) {
	if f.stopping.Load() {
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err == nil {
		f.err = err
	}
}

func (f *flow) Err() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.err
}

func startFlow(t testing.TB, sender, receiver netns.NsHandle, dst string) *flow {
	t.Helper()
	f := &flow{}
	if err := inNS(receiver, func() (err error) {
		f.ln, err = net.Listen("tcp4", net.JoinHostPort(dst, "0"))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	accepted := make(chan net.Conn, 1)
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		for {
			c, err := f.ln.Accept()
			if err != nil {
				return
			}
			if f.accepts.Add(1) == 1 {
				accepted <- c
			} else {
				c.Close()
			}
		}
	}()
	if err := inNS(sender, func() (err error) {
		f.c, err = net.DialTimeout("tcp4", f.ln.Addr().String(), 5*time.Second)
		return err
	}); err != nil {
		f.ln.Close()
		t.Fatal(err)
	}
	f.s = <-accepted
	f.wg.Add(2)
	go func() { // receiver
		defer f.wg.Done()
		buf := make([]byte, 256<<10)
		for {
			n, err := f.s.Read(buf)
			f.received.Add(int64(n))
			if err != nil {
				if err != io.EOF {
					f.fail(err)
				}
				return
			}
		}
	}()
	go func() { // sender
		defer f.wg.Done()
		buf := make([]byte, 64<<10)
		for !f.stopping.Load() {
			if _, err := f.c.Write(buf); err != nil {
				f.fail(err)
				return
			}
		}
	}()
	t.Cleanup(f.stop)
	return f
}

func (f *flow) stop() {
	if f.stopping.Swap(true) {
		return
	}
	f.ln.Close()
	f.c.Close()
	f.s.Close()
	f.wg.Wait()
}

// measure returns the goodput over d in bits per second.
func (f *flow) measure(d time.Duration) float64 {
	b0, t0 := f.received.Load(), time.Now()
	time.Sleep(d)
	b1, t1 := f.received.Load(), time.Now()
	return float64(b1-b0) * 8 / t1.Sub(t0).Seconds()
}

func checkRate(t *testing.T, what string, got float64, rate uint64) {
	t.Helper()
	want := float64(rate) * goodputShare
	dev := got/want - 1
	t.Logf("%s: set %.1f Mbit/s, goodput %.2f Mbit/s (expected %.2f after headers), deviation %+.1f%%, raw goodput/rate %.3f",
		what, float64(rate)/1e6, got/1e6, want/1e6, dev*100, got/float64(rate))
	if math.Abs(dev) > 0.15 {
		t.Errorf("%s: goodput %.2f Mbit/s not within ±15%% of %.2f Mbit/s", what, got/1e6, want/1e6)
	}
}

type classSnap struct {
	bytes uint64
	drops uint32
}

func snapClass(t *testing.T, ns netns.NsHandle, link string) classSnap {
	t.Helper()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	l, err := h.LinkByName(link)
	if err != nil {
		t.Fatal(err)
	}
	cs, err := h.ClassList(l, rootHandle)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range cs {
		if c.Attrs().Handle == classHandle && c.Attrs().Statistics != nil {
			st := c.Attrs().Statistics
			return classSnap{bytes: st.Basic.Bytes, drops: st.Queue.Drops}
		}
	}
	t.Fatalf("%s: class a125:1 not found", link)
	return classSnap{}
}

// qdiscSummary lists (type, handle, parent) of every qdisc on link.
func qdiscSummary(t *testing.T, ns netns.NsHandle, link string) []string {
	t.Helper()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	l, err := h.LinkByName(link)
	if err != nil {
		t.Fatal(err)
	}
	qs, err := h.QdiscList(l)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, q := range qs {
		out = append(out, q.Type()+" "+netlink.HandleStr(q.Attrs().Handle)+" parent "+netlink.HandleStr(q.Attrs().Parent))
	}
	return out
}

func linkExists(t *testing.T, ns netns.NsHandle, name string) bool {
	t.Helper()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	_, err = h.LinkByName(name)
	return err == nil
}

func mustSet(t *testing.T, set func(context.Context, string, uint64) (bool, error), rate uint64, wantChanged bool) {
	t.Helper()
	ch, err := set(context.Background(), tapLink, rate)
	if err != nil {
		t.Fatalf("set %d: %v", rate, err)
	}
	if ch != wantChanged {
		t.Fatalf("set %d: changed=%v, want %v", rate, ch, wantChanged)
	}
}

// shapedTransfer is the common body of the egress and ingress tests: set
// rate1, measure a long-running stream, change to rate2 in place while the
// same stream runs, measure again.
func shapedTransfer(t *testing.T, tn *testNet, s *Netlink, egress bool) {
	const rate1, rate2, rate3 = 20_000_000, 5_000_000, 12_000_000
	set, shapedNS, shapedLink := s.SetEgress, tn.host, tapLink
	sender, receiver, dst := tn.host, tn.vm, vmIP // VM download
	if !egress {
		set, shapedLink = s.SetIngress, IFBName(tapLink)
		sender, receiver, dst = tn.vm, tn.host, hostIP // VM upload
	}
	ctx := context.Background()

	mustSet(t, set, rate1, true)
	mustSet(t, set, rate1, false) // idempotent: no write
	f := startFlow(t, sender, receiver, dst)

	time.Sleep(700 * time.Millisecond) // slow start, initial burst
	checkRate(t, "before changes", f.measure(2*time.Second), rate1)

	before := snapClass(t, shapedNS, shapedLink)
	q0 := qdiscSummary(t, shapedNS, shapedLink)
	t0 := time.Now()
	mustSet(t, set, rate2, true)
	t.Logf("in-place change took %v", time.Since(t0))
	after := snapClass(t, shapedNS, shapedLink)
	if after.bytes < before.bytes {
		t.Errorf("class byte counter went back (%d → %d): class was recreated, not changed", before.bytes, after.bytes)
	}
	if after.drops != before.drops {
		t.Errorf("drops rose across the change: %d → %d", before.drops, after.drops)
	}
	if q1 := qdiscSummary(t, shapedNS, shapedLink); len(q0) != len(q1) || q0[0] != q1[0] {
		t.Errorf("qdiscs changed across a rate change: %v → %v", q0, q1)
	}

	time.Sleep(500 * time.Millisecond) // the queue built at rate1 drains at rate2
	checkRate(t, "after change down", f.measure(2*time.Second), rate2)

	mustSet(t, set, rate3, true) // and up again, still the same stream
	time.Sleep(500 * time.Millisecond)
	checkRate(t, "after change up", f.measure(1500*time.Millisecond), rate3)
	if end := snapClass(t, shapedNS, shapedLink); end.bytes < after.bytes || end.drops != before.drops {
		t.Errorf("class counters across the second change: %+v → %+v", after, end)
	}

	if err := f.Err(); err != nil {
		t.Errorf("the long-running stream broke: %v", err)
	}
	if n := f.accepts.Load(); n != 1 {
		t.Errorf("%d connections accepted, want the same single stream", n)
	}
	end := snapClass(t, shapedNS, shapedLink)
	t.Logf("class a125:1 on %s: %d bytes, %d drops during the whole test", shapedLink, end.bytes, end.drops)
	f.stop()

	r, err := s.Get(ctx, tapLink)
	if err != nil {
		t.Fatal(err)
	}
	want := Rates{EgressBitsPerSec: rate3}
	if !egress {
		want = Rates{IngressBitsPerSec: rate3}
	}
	if r != want {
		t.Errorf("Get = %+v, want %+v", r, want)
	}
}

func assertCleared(t *testing.T, tn *testNet, s *Netlink) {
	t.Helper()
	ch, err := s.Clear(context.Background(), tapLink)
	if err != nil || !ch {
		t.Fatalf("Clear = %v, %v", ch, err)
	}
	if ch, err := s.Clear(context.Background(), tapLink); err != nil || ch {
		t.Fatalf("second Clear = %v, %v; want no write", ch, err)
	}
	for _, q := range qdiscSummary(t, tn.host, tapLink) {
		if q[:3] == "htb" || q[:7] == "ingress" {
			t.Errorf("left behind on %s: %s", tapLink, q)
		}
	}
	if linkExists(t, tn.host, IFBName(tapLink)) {
		t.Errorf("IFB %s left behind", IFBName(tapLink))
	}
	if r, err := s.Get(context.Background(), tapLink); err != nil || r != (Rates{}) {
		t.Errorf("Get after Clear = %+v, %v", r, err)
	}
}

func TestEgressShapingInPlace(t *testing.T) {
	tn := newTestNet(t)
	s := newShaper(t, tn.host)
	shapedTransfer(t, tn, s, true)
	assertCleared(t, tn, s)
}

func TestIngressShapingViaIFB(t *testing.T) {
	tn := newTestNet(t)
	s := newShaper(t, tn.host)
	shapedTransfer(t, tn, s, false)
	if !linkExists(t, tn.host, IFBName(tapLink)) {
		t.Fatal("IFB missing while shaping")
	}
	assertCleared(t, tn, s)
}

func TestBothDirectionsAndClear(t *testing.T) {
	tn := newTestNet(t)
	s := newShaper(t, tn.host)
	ctx := context.Background()
	mustSet(t, s.SetEgress, 30_000_000, true)
	mustSet(t, s.SetIngress, 10_000_000, true)
	mustSet(t, s.SetIngress, 10_000_000, false)
	mustSet(t, s.SetEgress, 30_000_000, false)
	r, err := s.Get(ctx, tapLink)
	if err != nil || r != (Rates{EgressBitsPerSec: 30_000_000, IngressBitsPerSec: 10_000_000}) {
		t.Fatalf("Get = %+v, %v", r, err)
	}
	// A non-multiple of 8 is kept in whole bytes per second.
	mustSet(t, s.SetEgress, 1_000_007, true)
	mustSet(t, s.SetEgress, 1_000_007, false)
	if r, _ := s.Get(ctx, tapLink); r.EgressBitsPerSec != 1_000_000 {
		t.Fatalf("Get egress = %d, want 1000000", r.EgressBitsPerSec)
	}
	assertCleared(t, tn, s)
}

// TestIFBRecreatedAndTapVanished: a lost IFB is recreated and the redirect
// re-pointed; Clear after the tap vanished still removes the IFB.
func TestIFBRecreatedAndTapVanished(t *testing.T) {
	tn := newTestNet(t)
	s := newShaper(t, tn.host)
	ctx := context.Background()
	mustSet(t, s.SetIngress, 8_000_000, true)
	h, err := netlink.NewHandleAt(tn.host)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	ifb, err := h.LinkByName(IFBName(tapLink))
	if err != nil {
		t.Fatal(err)
	}
	if err := h.LinkDel(ifb); err != nil {
		t.Fatal(err)
	}
	if r, err := s.Get(ctx, tapLink); err != nil || r.IngressBitsPerSec != 0 {
		t.Fatalf("Get with the IFB gone = %+v, %v; want ingress 0", r, err)
	}
	mustSet(t, s.SetIngress, 8_000_000, true) // repairs
	mustSet(t, s.SetIngress, 8_000_000, false)
	if r, err := s.Get(ctx, tapLink); err != nil || r.IngressBitsPerSec != 8_000_000 {
		t.Fatalf("Get after repair = %+v, %v", r, err)
	}
	tap, err := h.LinkByName(tapLink)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.LinkDel(tap); err != nil { // the VM went away
		t.Fatal(err)
	}
	if _, err := s.SetEgress(ctx, tapLink, 8_000_000); !errors.Is(err, ErrNoLink) {
		t.Fatalf("SetEgress on a vanished tap = %v, want ErrNoLink", err)
	}
	if ch, err := s.Clear(ctx, tapLink); err != nil || !ch {
		t.Fatalf("Clear of a vanished tap = %v, %v; want the IFB removed", ch, err)
	}
	if linkExists(t, tn.host, IFBName(tapLink)) {
		t.Fatal("IFB left behind after Clear")
	}
}

func TestRejectsBeforeWriting(t *testing.T) {
	tn := newTestNet(t)
	s := newShaper(t, tn.host)
	ctx := context.Background()
	before := qdiscSummary(t, tn.host, tapLink)
	for _, rate := range []uint64{0, MinRate - 1, MaxRate + 1} {
		if _, err := s.SetEgress(ctx, tapLink, rate); !errors.Is(err, ErrInvalidRate) {
			t.Errorf("SetEgress(%d) = %v", rate, err)
		}
		if _, err := s.SetIngress(ctx, tapLink, rate); !errors.Is(err, ErrInvalidRate) {
			t.Errorf("SetIngress(%d) = %v", rate, err)
		}
	}
	if _, err := s.SetEgress(ctx, "no/such", 1_000_000); !errors.Is(err, ErrInvalidLink) {
		t.Errorf("bad name: %v", err)
	}
	if _, err := s.SetEgress(ctx, "nosuch0", 1_000_000); !errors.Is(err, ErrNoLink) {
		t.Errorf("missing link: %v", err)
	}
	if _, err := s.Get(ctx, "nosuch0"); !errors.Is(err, ErrNoLink) {
		t.Errorf("Get missing link: %v", err)
	}
	if ch, err := s.Clear(ctx, "nosuch0"); err != nil || ch {
		t.Errorf("Clear missing link = %v, %v; want no-op", ch, err)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := s.SetEgress(cctx, tapLink, 1_000_000); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled: %v", err)
	}
	after := qdiscSummary(t, tn.host, tapLink)
	if len(before) != len(after) || before[0] != after[0] {
		t.Errorf("qdiscs changed by rejected calls: %v → %v", before, after)
	}
	if linkExists(t, tn.host, IFBName(tapLink)) {
		t.Errorf("rejected SetIngress created an IFB")
	}
}

func TestRefusesForeignQdisc(t *testing.T) {
	tn := newTestNet(t)
	s := newShaper(t, tn.host)
	h, err := netlink.NewHandleAt(tn.host)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	l, err := h.LinkByName(tapLink)
	if err != nil {
		t.Fatal(err)
	}
	// Someone else's shaping (libvirt-style handle 1:).
	tbf := &netlink.Tbf{
		QdiscAttrs: netlink.QdiscAttrs{LinkIndex: l.Attrs().Index, Handle: netlink.MakeHandle(1, 0), Parent: netlink.HANDLE_ROOT},
		Rate:       1_250_000, Limit: 100_000, Buffer: 50_000,
	}
	if err := h.QdiscAdd(tbf); err != nil {
		t.Fatal(err)
	}
	if _, err := s.SetEgress(context.Background(), tapLink, 10_000_000); !errors.Is(err, ErrForeign) {
		t.Fatalf("SetEgress over a foreign root = %v, want ErrForeign", err)
	}
	if q := qdiscSummary(t, tn.host, tapLink); q[0][:3] != "tbf" {
		t.Fatalf("foreign qdisc touched: %v", q)
	}
	if ch, err := s.Clear(context.Background(), tapLink); err != nil || ch {
		t.Fatalf("Clear touched a foreign qdisc: %v, %v", ch, err)
	}
	if q := qdiscSummary(t, tn.host, tapLink); q[0][:3] != "tbf" {
		t.Fatalf("foreign qdisc removed by Clear: %v", q)
	}
}

// BenchmarkEgressChange measures one in-place rate change (tc class change
// through netlink) on an installed HTB class.
func BenchmarkEgressChange(b *testing.B) {
	benchChange(b, true)
}

// BenchmarkIngressChange: the same on the IFB (the upload direction),
// including the checks of the ingress qdisc and redirect filter.
func BenchmarkIngressChange(b *testing.B) {
	benchChange(b, false)
}

// BenchmarkEgressNoop: Set with the rate already applied (reads only).
func BenchmarkEgressNoop(b *testing.B) {
	tn := newTestNet(b)
	s := newShaper(b, tn.host)
	ctx := context.Background()
	if _, err := s.SetEgress(ctx, tapLink, 10_000_000); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	start := time.Now()
	for i := 0; i < b.N; i++ {
		if ch, err := s.SetEgress(ctx, tapLink, 10_000_000); err != nil || ch {
			b.Fatalf("no-op %d: %v, %v", i, ch, err)
		}
	}
	b.ReportMetric(float64(time.Since(start).Microseconds())/1000/float64(b.N), "ms/call")
}

func benchChange(b *testing.B, egress bool) {
	tn := newTestNet(b)
	s := newShaper(b, tn.host)
	set := s.SetEgress
	if !egress {
		set = s.SetIngress
	}
	ctx := context.Background()
	if _, err := set(ctx, tapLink, 10_000_000); err != nil {
		b.Fatal(err)
	}
	rates := [2]uint64{20_000_000, 10_000_000}
	b.ResetTimer()
	start := time.Now()
	for i := 0; i < b.N; i++ {
		ch, err := set(ctx, tapLink, rates[i%2])
		if err != nil || !ch {
			b.Fatalf("change %d: %v, %v", i, ch, err)
		}
	}
	b.ReportMetric(float64(time.Since(start).Microseconds())/1000/float64(b.N), "ms/change")
}
