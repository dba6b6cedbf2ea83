package qmpact_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/ars-dev/ars/agent/actuator/qmpact"
	"github.com/ars-dev/ars/agent/qmp"
	"github.com/ars-dev/ars/internal/vm"
	"github.com/ars-dev/ars/internal/vmtest"
)

// One guest for the whole package: 1 of 2 vCPUs, 256 MiB, balloon, disk.
var guest = vmtest.NewShared(vm.Config{Name: "qmpact", VCPUs: 1, MaxVCPUs: 2, MemMiB: 256, Disk: true})

func TestMain(m *testing.M) { os.Exit(guest.Run(m)) }

const MiB = 1 << 20

func ctxT(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// connect opens the guest's QMP socket (peer PID checked) through a
// Reconnecting connection and a Controller; both are closed in t.Cleanup,
// which runs after the test's own restore cleanups registered later.
func connect(t testing.TB, v *vm.VM, opts ...qmpact.Options) (*qmpact.Controller, *qmpact.Reconnecting) {
	t.Helper()
	var o qmpact.Options
	if len(opts) > 0 {
		o = opts[0]
	}
	ctx := ctxT(t, 15*time.Second)
	r, err := qmpact.DialReconnecting(ctx, v.QMPPath, qmp.Options{ExpectPID: v.PID})
	if err != nil {
		t.Fatalf("dial %s: %v", v.QMPPath, err)
	}
	t.Cleanup(func() { r.Close() })
	c, err := qmpact.NewController(ctx, r, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, r
}

// TestGuestBalloon: the guest's balloon actual follows the target down and
// back, BALLOON_CHANGE events are tracked, and guest memory stats are read.
func TestGuestBalloon(t *testing.T) {
	v := guest.Get(t)
	c, _ := connect(t, v)
	ctx := ctxT(t, 40*time.Second)
	max := c.Limits().MaxMem
	if max != 256*MiB {
		t.Fatalf("MaxMem from query-memory-size-summary = %d, want 256 MiB", max)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := c.Balloon(ctx, max); err != nil {
			t.Errorf("restore balloon: %v", err)
		}
		c.WaitBalloon(ctx, max, MiB)
	})

	a0, err := c.BalloonActual(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("balloon actual at start: %d MiB", a0/MiB)

	for _, target := range []uint64{160 * MiB, max} {
		start := time.Now()
		if err := c.Balloon(ctx, target); err != nil {
			t.Fatalf("balloon %d MiB: %v", target/MiB, err)
		}
		wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		a, err := c.WaitBalloon(wctx, target, MiB)
		cancel()
		if err != nil {
			t.Fatalf("balloon %d MiB: %v", target/MiB, err)
		}
		took := time.Since(start)
		t.Logf("balloon target %d MiB: actual %d MiB after %v", target/MiB, a/MiB, took.Round(time.Millisecond))
		// The last BALLOON_CHANGE should agree with query-balloon.
		deadline := time.Now().Add(2 * time.Second)
		for {
			ev, _, ok := c.LastBalloonChange()
			if ok && ev+MiB >= target && ev <= target+MiB {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("last BALLOON_CHANGE actual %d MiB (seen=%v), want ~%d MiB", ev/MiB, ok, target/MiB)
			}
			time.Sleep(50 * time.Millisecond)
		}
		if target == 160*MiB {
			// Guest statistics through the balloon driver, polled every 2 s.
			var ms qmpact.MemStats
			sdl := time.Now().Add(8 * time.Second)
			for {
				ms, err = c.GuestMemStats(ctx)
				if err != nil {
					t.Fatalf("GuestMemStats: %v", err)
				}
				if ms.Total > 0 && ms.Total <= int64(target) && ms.LastUpdate.After(start.Add(-time.Second)) {
					break
				}
				if time.Now().After(sdl) {
					t.Fatalf("guest stats %+v: want total memory <= %d MiB reported after the change", ms, target/MiB)
				}
				time.Sleep(500 * time.Millisecond)
			}
			t.Logf("guest stats at 160 MiB: total %d MiB, free %d MiB, available %d MiB",
				ms.Total/MiB, ms.Free/MiB, ms.Available/MiB)
			if ms.Free <= 0 || ms.Free > ms.Total {
				t.Errorf("guest free memory %d of %d", ms.Free, ms.Total)
			}
		}
	}
	if n := c.EventCount("BALLOON_CHANGE"); n == 0 {
		t.Error("no BALLOON_CHANGE event seen")
	}
}

func threads(t testing.TB, pid int) []string {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, e := range ents {
		ids = append(ids, e.Name())
	}
	return ids
}

// TestGuestCPUHotplug: a hot-added vCPU gets a new host thread, the guest
// answers the ACPI hotplug and brings the CPU online; device_del then
// completes with DEVICE_DELETED.
func TestGuestCPUHotplug(t *testing.T) {
	v := guest.Get(t)
	if guestHadUnplug {
		// QEMU 7.2/TCG aborts on a vCPU device_add after an unplug; a
		// second run (-count=2) on the shared guest would kill it.
		t.Skip("the shared guest already had a vCPU unplugged; re-plugging crashes QEMU 7.2 under TCG")
	}
	// No slot polling during the test: the unplug must be completed by the
	// DEVICE_DELETED event.
	c, _ := connect(t, v, qmpact.Options{UnplugPoll: time.Hour})
	ctx := ctxT(t, 60*time.Second)

	slots, err := c.HotplugCPUs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(slots) != 2 || !slots[0].Plugged() || slots[1].Plugged() {
		t.Fatalf("slots %+v: want boot vCPU + one free slot", slots)
	}
	boot := slots[0]
	if boot.Hotplugged() || boot.ThreadID == 0 {
		t.Fatalf("boot vCPU %+v", boot)
	}
	before := threads(t, v.PID)

	start := time.Now()
	s, err := c.AddCPU(ctx)
	if err != nil {
		log, _ := os.ReadFile(v.QEMULog)
		t.Fatalf("AddCPU: %v\nQEMU log:\n%s", err, log)
	}
	plugged := time.Since(start)
	removed := false
	t.Cleanup(func() {
		if removed {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		if err := c.RemoveCPU(ctx, s.ID); err != nil {
			t.Logf("cleanup: remove %s: %v", s.ID, err)
		}
	})
	t.Logf("AddCPU: %s in %v: thread %d, props %v", s.ID, plugged.Round(time.Millisecond), s.ThreadID, s.Props)
	if !s.Hotplugged() || s.ThreadID == 0 || s.ThreadID == boot.ThreadID {
		t.Fatalf("added slot %+v", s)
	}
	tid := fmt.Sprint(s.ThreadID)
	if slices.Contains(before, tid) {
		t.Errorf("vCPU thread %s existed before the hotplug", tid)
	}
	if _, err := os.Stat(fmt.Sprintf("/proc/%d/task/%d", v.PID, s.ThreadID)); err != nil {
		t.Errorf("vCPU thread %d not a task of QEMU pid %d: %v", s.ThreadID, v.PID, err)
	}
	if _, err := c.AddCPU(ctx); !errors.Is(err, qmpact.ErrNoFreeSlot) {
		t.Errorf("second AddCPU with no free slot: %v, want ErrNoFreeSlot", err)
	}

	// The guest onlines it (its init loop writes .../cpuN/online).
	var st vm.Status
	for st.CPUs != 2 && ctx.Err() == nil {
		st, err = v.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if st.CPUs != 2 {
			time.Sleep(200 * time.Millisecond)
		}
	}
	if st.CPUs != 2 {
		t.Fatalf("guest reports %d CPUs online, want 2", st.CPUs)
	}
	t.Logf("guest reports 2 CPUs online %v after device_add", time.Since(start).Round(time.Millisecond))
	if o, ok := c.OST(s.ID); !ok || o.Status != 0 {
		t.Errorf("ACPI_DEVICE_OST for %s: %+v (seen %v), want status 0", s.ID, o, ok)
	} else {
		t.Logf("ACPI _OST for %s: source %d status %d", s.ID, o.Source, o.Status)
	}

	// Unplug: under TCG the Debian guest offlines and ejects the vCPU. QEMU
	// 7.2 then sends DEVICE_DELETED for the vCPU's lapic child only
	// (/machine/peripheral/ID/lapic), none for the vCPU itself; RemoveCPU
	// wakes on it and confirms with query-hotpluggable-cpus. Slot polling
	// is off here, so the event is what completes it.
	if err := c.RemoveCPU(ctx, "cpu0-not-there"); !errors.Is(err, qmpact.ErrNotFound) {
		t.Errorf("RemoveCPU of an unknown id: %v, want ErrNotFound", err)
	}
	start = time.Now()
	rctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	err = c.RemoveCPU(rctx, s.ID)
	cancel()
	if err != nil {
		t.Fatalf("RemoveCPU %s: %v (DEVICE_DELETED seen %d)", s.ID, err, c.EventCount("DEVICE_DELETED"))
	}
	removed, guestHadUnplug = true, true
	t.Logf("RemoveCPU %s: DEVICE_DELETED after %v", s.ID, time.Since(start).Round(time.Millisecond))
	if c.EventCount("DEVICE_DELETED") == 0 {
		t.Error("RemoveCPU returned without a DEVICE_DELETED event")
	}
	if _, err := os.Stat(fmt.Sprintf("/proc/%d/task/%d", v.PID, s.ThreadID)); err == nil {
		t.Errorf("vCPU thread %d still exists after unplug", s.ThreadID)
	}
	for st.CPUs != 1 && ctx.Err() == nil {
		if st, err = v.Status(ctx); err != nil {
			t.Fatal(err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if st.CPUs != 1 {
		t.Errorf("guest reports %d CPUs after unplug, want 1", st.CPUs)
	}
	slots, err = c.HotplugCPUs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if slots[1].Plugged() {
		t.Errorf("slot still plugged after unplug: %+v", slots[1])
	}
	// Re-plugging now would crash this QEMU: refused.
	if _, err := c.AddCPU(ctx); !errors.Is(err, qmpact.ErrReplugUnsafe) {
		t.Errorf("AddCPU after an unplug: %v, want ErrReplugUnsafe", err)
	}
}

// guestHadUnplug records that the shared guest's QEMU had a vCPU unplugged.
var guestHadUnplug bool

// wrBytes reads a drive's written bytes from query-blockstats.
func wrBytes(t testing.TB, ctx context.Context, r *qmpact.Reconnecting, device string) uint64 {
	t.Helper()
	var stats []struct {
		Device string `json:"device"`
		Stats  struct {
			WrBytes uint64 `json:"wr_bytes"`
		} `json:"stats"`
	}
	if err := r.Execute(ctx, "query-blockstats", nil, &stats); err != nil {
		t.Fatal(err)
	}
	for _, s := range stats {
		if s.Device == device {
			return s.Stats.WrBytes
		}
	}
	t.Fatalf("no %s in query-blockstats", device)
	return 0
}

// writeRate measures the drive's write rate in KiB/s over d.
func writeRate(t testing.TB, ctx context.Context, r *qmpact.Reconnecting, device string, d time.Duration) float64 {
	a, start := wrBytes(t, ctx, r, device), time.Now()
	time.Sleep(d)
	b := wrBytes(t, ctx, r, device)
	return float64(b-a) / 1024 / time.Since(start).Seconds()
}

// TestGuestBlockThrottle: a bps limit below the guest's write load shows in
// query-block and brings the measured write rate down to it.
func TestGuestBlockThrottle(t *testing.T) {
	v := guest.Get(t)
	c, r := connect(t, v)
	ctx := ctxT(t, 60*time.Second)

	// Find the guest disk's drive (the backend behind qdev vda).
	var blocks []struct {
		Device   string          `json:"device"`
		Qdev     string          `json:"qdev"`
		Inserted *map[string]any `json:"inserted"`
	}
	if err := r.Execute(ctx, "query-block", nil, &blocks); err != nil {
		t.Fatal(err)
	}
	var drive string
	for _, b := range blocks {
		if b.Inserted != nil && (b.Qdev == "vda" || b.Qdev == "/machine/peripheral/vda/virtio-backend") {
			drive = b.Device
		}
	}
	if drive == "" {
		t.Fatalf("no drive behind qdev vda in query-block: %+v", blocks)
	}
	t.Logf("guest disk drive: %s (cache=%s)", drive, v.DiskCache)

	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := v.SetLoad(ctx, vm.Load{}); err != nil {
			t.Errorf("restore load: %v", err)
		}
		if err := c.SetBlockThrottle(ctx, drive, qmpact.Throttle{}); err != nil {
			t.Errorf("restore throttle: %v", err)
		}
	})
	if th, err := c.BlockThrottle(ctx, drive); err != nil || th != (qmpact.Throttle{}) {
		t.Fatalf("initial throttle %+v, %v; want none", th, err)
	}

	const loadKiB, limitKiB = 1024, 256
	if err := v.SetLoad(ctx, vm.Load{IOKiBps: loadKiB}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	free := writeRate(t, ctx, r, drive, 2*time.Second)
	t.Logf("unthrottled: %.0f KiB/s written (load %d KiB/s)", free, loadKiB)
	if free < 2*limitKiB {
		t.Fatalf("unthrottled write rate %.0f KiB/s (load %d): too close to the %d KiB/s limit to show it", free, loadKiB, limitKiB)
	}

	want := qmpact.Throttle{BPS: limitKiB * 1024}
	if err := c.SetBlockThrottle(ctx, drive, want); err != nil {
		t.Fatal(err)
	}
	// By qdev id too: the same drive, the same limits.
	for _, name := range []string{drive, "vda"} {
		got, err := c.BlockThrottle(ctx, name)
		if err != nil || got != want {
			t.Fatalf("BlockThrottle(%s) = %+v, %v; want %+v", name, got, err, want)
		}
	}
	time.Sleep(time.Second) // let the throttle's bucket settle
	thr := writeRate(t, ctx, r, drive, 4*time.Second)
	t.Logf("throttled to %d KiB/s: %.0f KiB/s written", limitKiB, thr)
	if thr < limitKiB*0.8 || thr > limitKiB*1.2 {
		t.Errorf("throttled write rate %.0f KiB/s, want %d ±20%%", thr, limitKiB)
	}

	if err := c.SetBlockThrottle(ctx, "nosuchdrive", want); !errors.Is(err, qmpact.ErrNotFound) {
		t.Errorf("unknown drive: %v, want ErrNotFound", err)
	}
	if err := c.SetBlockThrottle(ctx, drive, qmpact.Throttle{}); err != nil {
		t.Fatal(err)
	}
	if got, err := c.BlockThrottle(ctx, drive); err != nil || got != (qmpact.Throttle{}) {
		t.Fatalf("after removing the limit: %+v, %v", got, err)
	}
}

// BenchmarkQueryBalloon is the cost of one QMP round trip (query-balloon,
// decoded) on the running TCG guest.
func BenchmarkQueryBalloon(b *testing.B) {
	v := guest.Get(b)
	c, _ := connect(b, v)
	ctx := context.Background()
	b.ResetTimer()
	for b.Loop() {
		if _, err := c.BalloonActual(ctx); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Microseconds())/1000/float64(b.N), "ms/op")
}

// BenchmarkSetBlockThrottle is the cost of SetBlockThrottle: query-block
// (to resolve the drive) plus block_set_io_throttle.
func BenchmarkSetBlockThrottle(b *testing.B) {
	v := guest.Get(b)
	c, _ := connect(b, v)
	ctx := context.Background()
	b.Cleanup(func() { c.SetBlockThrottle(context.Background(), "disk0", qmpact.Throttle{}) })
	i := int64(0)
	for b.Loop() {
		i++
		if err := c.SetBlockThrottle(ctx, "disk0", qmpact.Throttle{IOPS: 1000 + i%2}); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Microseconds())/1000/float64(b.N), "ms/op")
}
