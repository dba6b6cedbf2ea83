package ipc

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"testing"
	"time"
)

// BenchmarkIPC64 compares, cross-process, 64-byte messages through the
// ring (producer in a re-executed helper process) and through a Unix
// SOCK_SEQPACKET connection (same helper arrangement), plus an in-process
// Go channel for orientation. Run with -benchtime 1x: each iteration does
// the whole fixed-size measurement and reports it as metrics.
//
//	go test -run '^$' -bench IPC64 -benchtime 1x -count 3 ./ipc/
func BenchmarkIPC64(b *testing.B) {
	const nThr = 5_000_000
	const nUnix = 1_000_000
	const nLat = 20_000
	for i := 0; i < b.N; i++ {
		ring := ringThroughput(b, nThr)
		unixT := unixThroughput(b, nUnix)
		ch := chanThroughput(nThr)
		// Spinning presumes a CPU per side: pin the producer to CPU 0 and
		// this process to CPU 1 (unpinned, the scheduler may stack both on
		// one CPU and every record waits for a time slice or a yield).
		spin := spinLatency(b, nLat)
		block := ringLatency(b, "latb", 2000, RingConfig{Spin: 1})
		ul := unixLatency(b, nLat)
		b.ReportMetric(ring, "ring_msgs/s")
		b.ReportMetric(ring*64/1e6, "ring_MB/s")
		b.ReportMetric(unixT, "unix_msgs/s")
		b.ReportMetric(ch, "chan_msgs/s")
		b.ReportMetric(ring/unixT, "ratio")
		b.ReportMetric(pct(spin, 50), "spin_p50_ns")
		b.ReportMetric(pct(spin, 99), "spin_p99_ns")
		b.ReportMetric(pct(block, 50), "block_p50_ns")
		b.ReportMetric(pct(block, 99), "block_p99_ns")
		b.ReportMetric(pct(ul, 50), "unix_p50_ns")
		b.ReportMetric(pct(ul, 99), "unix_p99_ns")
		fmt.Printf("ipc detail ring_MB_per_s=%.0f chan_msgs_per_s=%.0f spin_p50_ns=%.0f spin_p99_ns=%.0f block_p50_ns=%.0f block_p99_ns=%.0f unix_p50_ns=%.0f unix_p99_ns=%.0f\n",
			ring*64/1e6, ch, pct(spin, 50), pct(spin, 99), pct(block, 50), pct(block, 99), pct(ul, 50), pct(ul, 99))
		fmt.Printf("ipc ring_msgs_per_s=%.0f unix_msgs_per_s=%.0f ratio=%.1f p99_ns=%.0f\n", ring, unixT, ring/unixT, pct(spin, 99))
	}
}

func pct(v []int64, p int) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	return float64(s[(len(s)-1)*p/100])
}

func ringThroughput(b *testing.B, n int) float64 {
	c, cmd := startHelper(b, fmt.Sprintf("bench %d", n), RingConfig{Spin: -1})
	defer c.Close()
	buf := make([]byte, 64)
	if err := c.ReadRecord(buf); err != nil {
		b.Fatal(err)
	}
	start := time.Now()
	got := 1
	for {
		err := c.ReadRecord(buf)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			b.Fatal(err)
		}
		got++
	}
	el := time.Since(start)
	cmd.Wait()
	if got != n {
		b.Fatalf("got %d records, want %d", got, n)
	}
	return float64(n-1) / el.Seconds()
}

func ringLatency(b *testing.B, mode string, n int, cfg RingConfig) []int64 {
	return ringLatencyOn(b, fmt.Sprintf("%s %d", mode, n), cfg, -1)
}

// ringLatencyOn runs a latency helper (mode "lat N" or "latb N [US]"),
// pinned to helperCPU when ≥ 0, and returns the one-way latencies.
func ringLatencyOn(b *testing.B, mode string, cfg RingConfig, helperCPU int) []int64 {
	c, cmd := startHelperOn(b, mode, cfg, helperCPU)
	defer c.Close()
	buf := make([]byte, 64)
	var lat []int64
	for {
		err := c.ReadRecord(buf)
		now := time.Now().UnixNano()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			b.Fatal(err)
		}
		lat = append(lat, now-int64(binary.LittleEndian.Uint64(buf[8:])))
	}
	cmd.Wait()
	return lat[min(len(lat), 100):] // warm-up
}

func spinLatency(b *testing.B, n int) []int64 {
	if runtime.NumCPU() < 2 {
		return ringLatency(b, "lat", n, RingConfig{Spin: -1})
	}
	restore := pinProcess(1)
	defer restore()
	return ringLatencyOn(b, fmt.Sprintf("lat %d", n), RingConfig{Spin: -1}, 0)
}

func chanThroughput(n int) float64 {
	ch := make(chan [64]byte, 4096)
	go func() {
		var r [64]byte
		for i := 0; i < n; i++ {
			binary.LittleEndian.PutUint64(r[:], uint64(i))
			ch <- r
		}
		close(ch)
	}()
	start := time.Now()
	for range ch {
	}
	return float64(n) / time.Since(start).Seconds()
}

// unixPeer starts the helper as a SOCK_SEQPACKET client of a listener
// here and returns the accepted connection.
func unixPeer(b *testing.B, mode string, n int) (*net.UnixConn, *exec.Cmd) {
	path := filepath.Join(b.TempDir(), "u.sock")
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	cmd := exec.Command(os.Args[0], "-test.run=^TestUnixHelperProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), fmt.Sprintf("ARS_UNIX_HELPER=%s %d %s", mode, n, path))
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	ln.SetDeadline(time.Now().Add(10 * time.Second))
	c, err := ln.AcceptUnix()
	if err != nil {
		b.Fatal(err)
	}
	return c, cmd
}

func unixThroughput(b *testing.B, n int) float64 {
	c, cmd := unixPeer(b, "thr", n)
	defer c.Close()
	buf := make([]byte, 64)
	if _, err := c.Read(buf); err != nil {
		b.Fatal(err)
	}
	start := time.Now()
	got := 1
	for got < n {
		if _, err := c.Read(buf); err != nil {
			b.Fatal(err)
		}
		got++
	}
	el := time.Since(start)
	cmd.Wait()
	return float64(n-1) / el.Seconds()
}

func unixLatency(b *testing.B, n int) []int64 {
	c, cmd := unixPeer(b, "lat", n)
	defer c.Close()
	buf := make([]byte, 64)
	lat := make([]int64, 0, n)
	for len(lat) < n {
		if _, err := c.Read(buf); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Now().UnixNano()-int64(binary.LittleEndian.Uint64(buf[8:])))
		c.Write(buf[:1]) // ack: paces the sender like the ring's tail does
	}
	cmd.Wait()
	return lat[min(len(lat), 100):]
}

// TestUnixHelperProcess is not a test: with ARS_UNIX_HELPER="mode n path"
// it sends n 64-byte messages on a SOCK_SEQPACKET connection ("thr": as
// fast as possible; "lat": timestamped, each after the previous is acked).
func TestUnixHelperProcess(t *testing.T) {
	env := os.Getenv("ARS_UNIX_HELPER")
	if env == "" {
		return
	}
	var mode, path string
	var n int
	fmt.Sscanf(env, "%s %d %s", &mode, &n, &path)
	c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	msg := make([]byte, 64)
	ack := make([]byte, 8)
	for i := 0; i < n; i++ {
		binary.LittleEndian.PutUint64(msg, uint64(i))
		if mode == "lat" {
			binary.LittleEndian.PutUint64(msg[8:], uint64(time.Now().UnixNano()))
		}
		if _, err := c.Write(msg); err != nil {
			os.Exit(3)
		}
		if mode == "lat" {
			if _, err := c.Read(ack); err != nil {
				os.Exit(3)
			}
		}
	}
	os.Exit(0)
}
