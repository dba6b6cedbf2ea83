package cgroup

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ars-dev/ars/agent/cgroups"
	"github.com/ars-dev/ars/internal/testutil"
	"github.com/ars-dev/ars/internal/vm"
	"github.com/ars-dev/ars/internal/vmtest"
)

// The v2 path is tested for real inside a test guest, whose kernel mounts
// cgroup2 with every controller: TestV2InGuest builds this package's test
// binary statically, appends it and an init script to the guest's
// initramfs as a second cpio archive, boots the guest with
// rdinit=/ars-cgv2-init, and the guest runs TestGuestV2 and prints its
// result on the serial console.

const guestEnv = "ARS_CGV2_GUEST"

const guestInit = `#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
[ -c /dev/console ] && exec 0</dev/console 1>/dev/console 2>&1
/bin/busybox --install -s /bin
export PATH=/bin
mount -t tmpfs tmpfs /tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup
while read -r m; do insmod "/lib/modules/$m.ko" 2>/dev/null; done </lib/modules/load-order
echo "+cpu +cpuset +memory +io" >/sys/fs/cgroup/cgroup.subtree_control
echo "ARS-CGV2-BEGIN controllers: $(cat /sys/fs/cgroup/cgroup.subtree_control)"
` + guestEnv + `=1 /ars-cgv2.test -test.run '^TestGuestV2$' -test.v -test.count=1 -test.timeout=60s
echo "ARS-CGV2-EXIT $?"
sync
poweroff -f
`

// cpioNewc appends files (name → mode, data) to w as a newc archive.
func cpioNewc(w *bytes.Buffer, files []struct {
	name string
	mode uint32
	data []byte
}) {
	pad := func() {
		for w.Len()%4 != 0 {
			w.WriteByte(0)
		}
	}
	entry := func(ino int, name string, mode uint32, data []byte) {
		fmt.Fprintf(w, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
			ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name)+1, 0)
		w.WriteString(name)
		w.WriteByte(0)
		pad()
		w.Write(data)
		pad()
	}
	for i, f := range files {
		entry(i+1, f.name, f.mode, f.data)
	}
	entry(0, "TRAILER!!!", 0, nil)
}

func TestV2InGuest(t *testing.T) {
	if os.Getenv(guestEnv) != "" {
		return // inside the guest only TestGuestV2 runs
	}
	testutil.RequirePrivileged(t)
	testutil.RequireCommand(t, "qemu-system-x86_64")
	goTool := testutil.RequireCommand(t, "go")
	gd := vmtest.GuestDir(t)
	work := t.TempDir()

	bin := filepath.Join(work, "ars-cgv2.test")
	build := exec.Command(goTool, "test", "-c", "-o", bin, ".")
	build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOFLAGS=") // static; no -race (needs cgo)
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("static build: %v\n%s", err, out)
	}
	binData, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	base, err := os.ReadFile(filepath.Join(gd, "initramfs.gz"))
	if err != nil {
		t.Fatal(err)
	}
	var rd bytes.Buffer
	rd.Write(base)
	for rd.Len()%4 != 0 { // the kernel wants each archive 4-byte aligned
		rd.WriteByte(0)
	}
	cpioNewc(&rd, []struct {
		name string
		mode uint32
		data []byte
	}{
		{"ars-cgv2-init", 0o100755, []byte(guestInit)},
		{"ars-cgv2.test", 0o100755, binData},
	})
	initrd := filepath.Join(work, "initramfs")
	if err := os.WriteFile(initrd, rd.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}

	dir, err := os.MkdirTemp("", "ars-cgv2-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	ctx, cancel := context.WithTimeout(context.Background(), vmtest.ReadyTimeout)
	defer cancel()
	v, err := vm.Start(ctx, nil, vm.Config{
		Name: fmt.Sprintf("cgv2-%d", os.Getpid()), Dir: dir,
		Kernel: filepath.Join(gd, "vmlinuz"), Initrd: initrd,
		VCPUs: 2, MemMiB: 320, Disk: true, DiskMiB: 64, NoBalloon: true,
		KernelArgs: []string{"rdinit=/ars-cgv2-init"},
	})
	if err != nil {
		t.Fatalf("start guest: %v", err)
	}
	t.Cleanup(func() { _ = v.Close() })
	exitRE := regexp.MustCompile(`ARS-CGV2-EXIT (\d+)`)
	var serial string
	for {
		b, _ := os.ReadFile(v.SerialLog)
		serial = string(b)
		if exitRE.MatchString(serial) {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("guest test did not finish: %v; serial:\n%s", ctx.Err(), serial)
		case <-v.Exited():
			b, _ := os.ReadFile(v.SerialLog)
			if serial = string(b); !exitRE.MatchString(serial) {
				t.Fatalf("QEMU exited early; serial:\n%s", serial)
			}
		case <-time.After(200 * time.Millisecond):
		}
	}
	if i := strings.Index(serial, "ARS-CGV2-BEGIN"); i >= 0 {
		serial = serial[i:]
	}
	t.Logf("guest:\n%s", serial)
	if m := exitRE.FindStringSubmatch(serial); m[1] != "0" || !strings.Contains(serial, "--- PASS: TestGuestV2") {
		t.Fatalf("TestGuestV2 failed in the guest (exit %s)", m[1])
	}
}

// TestGuestV2 runs only inside the guest (see TestV2InGuest).
func TestGuestV2(t *testing.T) {
	if os.Getenv(guestEnv) == "" {
		return // runs only inside the test guest, started by TestV2InGuest (a pass here, not a skip)
	}
	h, err := cgroups.Detect(cgroups.DefaultPaths())
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []string{"cpu", "cpuset", "memory", "io"} {
		if h.VersionOf(c) != cgroups.V2 {
			t.Fatalf("%s is %v in the guest, want v2", c, h.VersionOf(c))
		}
	}
	o, err := h.CreateUnderSelf("ars-v2", "cpu", "cpuset", "memory", "io")
	if err != nil {
		t.Fatal(err)
	}
	tg := TargetFor(h, "vm", o.Rel)
	dir := tg.CPU.Path
	t.Logf("cgroup %s", dir)
	ctx := context.Background()
	w := New(Paths{Sys: "/sys"})
	var writes []string
	w.Trace = func(file, v string) { writes = append(writes, filepath.Base(file)+"="+v) }
	f := func(name string) string { return read(t, filepath.Join(dir, name)) }

	busy := start(t, exec.Command("sh", "-c", "while :; do :; done"))
	if err := o.AddPID(busy.Process.Pid); err != nil {
		t.Fatal(err)
	}

	t.Run("cpu", func(t *testing.T) {
		if err := w.SetCPU(ctx, tg, 10000, 50000); err != nil {
			t.Fatal(err)
		}
		if got := f("cpu.max"); got != "10000 50000" {
			t.Fatalf("cpu.max %q", got)
		}
		g := cgroups.Group{CPU: dir, CPUAcct: dir, CPUVersion: cgroups.V2}
		a, _ := cgroups.ReadCPU(g)
		time.Sleep(time.Second)
		b, err := cgroups.ReadCPU(g)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("nr_throttled %d→%d, use %.2f CPU", a.Throttled, b.Throttled, float64(b.UsageNs-a.UsageNs)/1e9)
		if b.Throttled-a.Throttled < 5 {
			t.Fatalf("not throttled")
		}
		if err := w.SetCPUWeight(ctx, tg, 250); err != nil || f("cpu.weight") != "250" {
			t.Fatalf("weight %v %q", err, f("cpu.weight"))
		}
		if err := w.SetCPU(ctx, tg, 999, 50000); !errors.Is(err, ErrInvalid) || f("cpu.max") != "10000 50000" {
			t.Fatalf("invalid: %v", err)
		}
		if err := w.SetCPU(ctx, tg, -1, 100000); err != nil || f("cpu.max") != "max 100000" {
			t.Fatalf("unlimit: %v %q", err, f("cpu.max"))
		}
	})

	t.Run("cpuset", func(t *testing.T) {
		if err := w.SetCpuset(ctx, tg, "0", "0"); err != nil {
			t.Fatal(err)
		}
		st := read(t, fmt.Sprintf("/proc/%d/status", busy.Process.Pid))
		if !strings.Contains(st, "Cpus_allowed_list:\t0\n") {
			t.Fatalf("Cpus_allowed_list:\n%s", st)
		}
		if err := w.SetCpuset(ctx, tg, "0-63", ""); !errors.Is(err, ErrInvalid) || f("cpuset.cpus") != "0" {
			t.Fatalf("outside parent: %v %q", err, f("cpuset.cpus"))
		}
	})

	t.Run("memory", func(t *testing.T) {
		self, _ := os.Executable()
		cmd := exec.Command(self)
		cmd.Env = append(os.Environ(), helperEnv+"=mem:32")
		stdin, _ := cmd.StdinPipe()
		stdout, _ := cmd.StdoutPipe()
		start(t, cmd)
		if err := o.AddPID(cmd.Process.Pid); err != nil {
			t.Fatal(err)
		}
		io.WriteString(stdin, "go\n")
		if line, err := bufio.NewReader(stdout).ReadString('\n'); err != nil || line != "ready\n" {
			t.Fatalf("helper %q %v", line, err)
		}
		usage, _ := strconv.ParseInt(f("memory.current"), 10, 64)
		t.Logf("memory.current %d MiB", usage>>20)
		const page = 4096
		writes = nil
		if err := w.SetMemory(ctx, tg, Memory{Max: (usage + 16<<20) / page * page, Soft: -1}); !errors.Is(err, ErrBelowUsage) || len(writes) != 0 || f("memory.max") != "max" {
			t.Fatalf("below usage: %v writes %v max %q", err, writes, f("memory.max"))
		}
		mx, hi := (usage+96<<20)/page*page, (usage+80<<20)/page*page
		if err := w.SetMemory(ctx, tg, Memory{Max: mx, Soft: hi}); err != nil {
			t.Fatal(err)
		}
		want := fmt.Sprintf("memory.high=%d memory.max=%d memory.high=%d", mx, mx, hi)
		if strings.Join(writes, " ") != want {
			t.Fatalf("lowering order %v want %s", writes, want)
		}
		if f("memory.max") != strconv.FormatInt(mx, 10) || f("memory.high") != strconv.FormatInt(hi, 10) {
			t.Fatalf("max %q high %q", f("memory.max"), f("memory.high"))
		}
		writes = nil
		if err := w.SetMemory(ctx, tg, Memory{Max: -1, Soft: -1}); err != nil {
			t.Fatal(err)
		}
		if writes[0] != "memory.max=9223372036854775807" || f("memory.max") != "max" || f("memory.high") != "max" {
			t.Fatalf("raising %v max %q high %q", writes, f("memory.max"), f("memory.high"))
		}
		stdin.Close()
	})

	t.Run("io", func(t *testing.T) {
		dev := read(t, "/sys/block/vda/dev")
		const rate = 2 << 20
		if err := w.SetBlockIO(ctx, tg, dev, IOLimit{WBps: rate}); err != nil {
			t.Fatal(err)
		}
		want := dev + " rbps=max wbps=2097152 riops=max wiops=max"
		if got := f("io.max"); got != want {
			t.Fatalf("io.max %q want %q", got, want)
		}
		const mib = 6
		script := fmt.Sprintf("echo $$ > %s/cgroup.procs && exec dd if=/dev/zero of=/dev/vda bs=1M count=%d oflag=direct", dir, mib)
		t0 := time.Now()
		if out, err := exec.Command("sh", "-c", script).CombinedOutput(); err != nil {
			t.Fatalf("dd: %v %s", err, out)
		}
		got := float64(mib<<20) / time.Since(t0).Seconds()
		t.Logf("dd %d MiB under %d MiB/s: %.2f MiB/s", mib, rate>>20, got/(1<<20))
		if got < 0.8*rate || got > 1.2*rate {
			t.Fatalf("rate %.2f MiB/s not within ±20%% of %d MiB/s", got/(1<<20), rate>>20)
		}
		if err := w.SetBlockIO(ctx, tg, dev, IOLimit{}); err != nil || f("io.max") != "" {
			t.Fatalf("remove: %v %q", err, f("io.max"))
		}
	})
}
