package collector

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ars-dev/ars/agent/telemetry"
)

// fakeBackend counts reads; Read reports every tracked tid with Count =
// reads so far and the tid's vCPU slot in Involuntary.
type fakeBackend struct {
	mu      sync.Mutex
	threads map[uint32][2]uint32
	vms     map[uint32]telemetry.VMRef
	reads   uint64
}

func (f *fakeBackend) Track(tid, vm, vcpu uint32) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if tid == 0 {
		return errors.New("tid 0")
	}
	f.threads[tid] = [2]uint32{vm, vcpu}
	return nil
}

func (f *fakeBackend) Untrack(tid uint32) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.threads, tid)
	return nil
}

func (f *fakeBackend) Read() (map[uint32]telemetry.VCPUStats, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.reads++
	m := map[uint32]telemetry.VCPUStats{}
	for tid, s := range f.threads {
		st := telemetry.VCPUStats{Count: f.reads, Involuntary: uint64(s[1])}
		st.Hist[3] = uint64(tid)
		m[tid] = st
	}
	return m, nil
}

func (f *fakeBackend) TrackVM(slot uint32, vm telemetry.VMRef) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.vms[slot] = vm
	return nil
}

func (f *fakeBackend) UntrackVM(slot uint32) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.vms, slot)
	return nil
}

// tickSpikes emits a spike every 50 ms until closed.
type tickSpikes struct{ done chan struct{} }

func (s *tickSpikes) Read() (telemetry.Spike, error) {
	select {
	case <-s.done:
		return telemetry.Spike{}, telemetry.ErrClosed
	case <-time.After(50 * time.Millisecond):
		return telemetry.Spike{TID: 7, Delay: 9 * time.Millisecond}, nil
	}
}

func (s *tickSpikes) Close() error { close(s.done); return nil }

var fakeGauge = prometheus.NewDesc("ars_fake_probe_value", "A fake telemetry metric.", []string{"vm"}, nil)

type fakeMetrics struct{}

func (fakeMetrics) Describe(ch chan<- *prometheus.Desc) { ch <- fakeGauge }
func (fakeMetrics) Collect(ch chan<- prometheus.Metric) {
	ch <- prometheus.MustNewConstMetric(fakeGauge, prometheus.GaugeValue, 42, "vm1")
}

// TestHelperCollector is not a test: re-executed by the tests below with
// ARS_COLLECTOR_HELPER=1 it is a collector process over a fake backend.
func TestHelperCollector(t *testing.T) {
	if os.Getenv("ARS_COLLECTOR_HELPER") != "1" {
		return
	}
	args := flag.Args()
	if len(args) != 2 || args[0] != "--engine-socket" {
		fmt.Fprintln(os.Stderr, "helper args:", args)
		os.Exit(2)
	}
	conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: args[1], Net: "unix"})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	b := &fakeBackend{threads: map[uint32][2]uint32{}, vms: map[uint32]telemetry.VMRef{}}
	err = Serve(context.Background(), conn, EngineIs(os.Getppid()), ServerConfig{Backend: b,
		Spikes: &tickSpikes{done: make(chan struct{})}, Metrics: fakeMetrics{}, RingCapacity: 1 << 16,
		Probes: []telemetry.ProbeStatus{{Name: "sched", Enabled: true, Loaded: true}}})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(3)
	}
	os.Exit(0)
}

func startTestClient(t *testing.T) *Client {
	t.Setenv("ARS_COLLECTOR_HELPER", "1")
	var logs syncBuilder
	c, err := Start(context.Background(), Options{Exe: os.Args[0],
		Args:         []string{"-test.run=^TestHelperCollector$", "-test.count=1", "--"},
		RestartDelay: 100 * time.Millisecond, Stderr: os.Stderr,
		Log: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

type syncBuilder struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuilder) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func TestClientAgainstCollectorProcess(t *testing.T) {
	c := startTestClient(t)
	if st := c.Status(); len(st) != 1 || !st[0].Loaded {
		t.Fatalf("probes from the hello: %+v", st)
	}
	if err := c.TrackVM(1, telemetry.VMRef{Name: "vm1", PID: 123}); err != nil {
		t.Fatal(err)
	}
	for i := uint32(0); i < 3; i++ {
		if err := c.Track(100+i, 1, i); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Track(0, 1, 9); err == nil || !strings.Contains(err.Error(), "tid 0") {
		t.Fatalf("backend error not passed on: %v", err)
	}
	if err := c.Untrack(102); err != nil {
		t.Fatal(err)
	}
	for want := uint64(1); want <= 3; want++ {
		m, err := c.Read()
		if err != nil {
			t.Fatal(err)
		}
		if len(m) != 2 || m[100].Count != want || m[101].Involuntary != 1 || m[101].Hist[3] != 101 {
			t.Fatalf("read %d: %+v", want, m)
		}
	}
	select {
	case <-c.Wake():
	case <-time.After(2 * time.Second):
		t.Fatal("no wake-up from the collector's spikes")
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(c)
	if n, err := testutil.GatherAndCount(reg, "ars_fake_probe_value", "ars_collector_up"); err != nil || n != 2 {
		t.Fatalf("metrics through the collector: %d %v", n, err)
	}

	// The collector dies: reported, restarted, tracking replayed.
	old := c.PID()
	if err := syscall.Kill(old, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		m, err := c.Read()
		if err == nil && c.PID() != old && c.PID() != 0 {
			if len(m) != 2 || m[100].Count != 1 {
				t.Fatalf("first read from the restarted collector: %+v", m)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("not restarted: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if c.Restarts() != 1 {
		t.Fatalf("restarts %d", c.Restarts())
	}
}

func TestClientStartFails(t *testing.T) {
	_, err := Start(context.Background(), Options{Exe: "/bin/false", StartTimeout: 5 * time.Second,
		Stderr: io.Discard})
	if err == nil {
		t.Fatal("a collector that exits at once started")
	}
	t.Log(err)
}

func TestSamplesWire(t *testing.T) {
	in := map[uint32]telemetry.VCPUStats{7: {RunDelayNs: 1, Count: 2, OnCPUNs: 3, Involuntary: 4, Wakeups: 5}, 9: {}}
	st := in[7]
	st.Hist[31] = 99
	in[7] = st
	b := appendSamples(nil, 42, in)
	id, out, err := decodeSamples(b)
	if err != nil || id != 42 || len(out) != 2 || out[7] != in[7] {
		t.Fatalf("round trip: %d %+v %v", id, out, err)
	}
	for _, bad := range [][]byte{b[:10], b[:len(b)-1], append(b, 0)} {
		if _, _, err := decodeSamples(bad); err == nil {
			t.Errorf("%d bytes decoded", len(bad))
		}
	}
	sp := telemetry.Spike{At: 5, Delay: 6, TID: 7, VMSlot: 8, VCPUSlot: 9}
	if got, err := decodeSpike(appendSpike(nil, sp)); err != nil || got != sp {
		t.Fatalf("spike: %+v %v", got, err)
	}
}
