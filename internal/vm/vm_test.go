package vm

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func testConfig(t *testing.T) Config {
	t.Helper()
	dir := t.TempDir()
	for _, f := range []string{"vmlinuz", "initramfs.gz"} {
		if err := os.WriteFile(filepath.Join(dir, f), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return Config{Name: "t1", Dir: dir, Kernel: filepath.Join(dir, "vmlinuz"), Initrd: filepath.Join(dir, "initramfs.gz")}
}

func TestDefaults(t *testing.T) {
	c, err := testConfig(t).withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	if c.VCPUs != 1 || c.MaxVCPUs != 4 || c.MemMiB != 192 || c.DiskMiB != 64 {
		t.Errorf("defaults: %+v", c)
	}
	if c.QMPSocket != filepath.Join(c.Dir, "qmp.sock") {
		t.Errorf("QMPSocket %q", c.QMPSocket)
	}
	if strings.Join(c.CgroupControllers, ",") != "cpu,cpuacct,memory" {
		t.Errorf("controllers %v", c.CgroupControllers)
	}

	bad := []func(*Config){
		func(c *Config) { c.Name = "" },
		func(c *Config) { c.Name = "a/b" },
		func(c *Config) { c.Name = "-x" },
		func(c *Config) { c.Name = strings.Repeat("n", 41) },
		func(c *Config) { c.Dir = "" },
		func(c *Config) { c.Kernel = "/nonexistent/vmlinuz" },
		func(c *Config) { c.VCPUs, c.MaxVCPUs = 3, 2 },
		func(c *Config) { c.MemMiB = 16 },
		func(c *Config) { c.Dir = "/" + strings.Repeat("d", 100) },
	}
	for i, mut := range bad {
		c := testConfig(t)
		mut(&c)
		if _, err := c.withDefaults(); err == nil {
			t.Errorf("bad config %d accepted: %+v", i, c)
		}
	}
	c = testConfig(t)
	c.Kernel = "/nonexistent/vmlinuz"
	if _, err := c.withDefaults(); err == nil || !strings.Contains(err.Error(), "run make guest") {
		t.Errorf("missing kernel error lacks the hint: %v", err)
	}
}

func TestAccel(t *testing.T) {
	c, err := testConfig(t).withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	c.Accel = "kvm"
	if got := strings.Join(qemuArgs(c, &VM{}), " "); !strings.Contains(got, "accel=kvm -cpu host") {
		t.Errorf("kvm args: %s", got)
	}
	if got := accel(""); got != "tcg" {
		t.Errorf("default accel %s, want tcg", got)
	}
	c.Accel = "hvf"
	if _, err := c.withDefaults(); err == nil {
		t.Error("accel hvf accepted")
	}
}

func TestQEMUArgs(t *testing.T) {
	c, err := testConfig(t).withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	c.Disk, c.Net = true, true
	c.Accel = "tcg"
	c.KernelArgs = []string{"ars.set=cpu=5"}
	c.ExtraArgs = []string{"-incoming", "defer"}
	v := &VM{QMPPath: c.QMPSocket, CtlPath: filepath.Join(c.Dir, ctlSocket), SerialLog: "/d/serial.log",
		DiskPath: "/d/disk.raw", DiskCache: "none", Tap: "ars-t1abc"}
	got := strings.Join(qemuArgs(c, v), " ")
	for _, want := range []string{
		"-machine q35,accel=tcg", "-cpu qemu64", "-smp 1,maxcpus=4", "-m 192", "-nodefaults",
		"-display none", "-no-reboot", "-serial file:/d/serial.log",
		"-qmp unix:" + c.QMPSocket + ",server=on,wait=off",
		"-append console=ttyS0 quiet panic=1 ars.set=cpu=5",
		"-device virtio-balloon-pci,id=balloon0",
		"-device virtserialport,bus=vser0.0,chardev=arsctl,name=ars.ctl",
		"file=/d/disk.raw,format=raw,if=none,id=disk0,cache=none,aio=native",
		"-netdev tap,id=net0,ifname=ars-t1abc,script=no,downscript=no",
		"-device virtio-net-pci,netdev=net0",
		"-incoming defer",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("args lack %q:\n%s", want, got)
		}
	}
	if strings.Contains(got, "-daemonize") {
		t.Error("QEMU must stay a foreground child")
	}
	c.NoBalloon = true
	v.DiskCache = "writeback"
	got = strings.Join(qemuArgs(c, v), " ")
	if strings.Contains(got, "balloon") || !strings.Contains(got, "cache=writeback,aio=threads") {
		t.Errorf("NoBalloon/writeback args wrong:\n%s", got)
	}
}

func TestTapName(t *testing.T) {
	for _, tc := range []struct{ name, want string }{
		{"shared", "ars-sharea1b2c3"},
		{"a.b-c", "ars-abca1b2c3"},
		{"x", "ars-xa1b2c3"},
	} {
		got := tapName(tc.name, "a1b2c3")
		if got != tc.want || len(got) > 15 {
			t.Errorf("tapName(%q) = %q, want %q (max 15 bytes)", tc.name, got, tc.want)
		}
	}
}

func TestParseStatus(t *testing.T) {
	s, err := ParseStatus("ok cpu=150 mem=64 io=512 net=500 cpus=2")
	if err != nil {
		t.Fatal(err)
	}
	if s != (Status{Load: Load{CPUPercent: 150, MemMiB: 64, IOKiBps: 512, NetKbps: 500}, CPUs: 2, MemAvailMiB: -1}) {
		t.Errorf("got %+v", s)
	}
	if s, err := ParseStatus("ok cpu=0 mem=0 io=0 net=0 cpus=1 memavail=97"); err != nil || s.MemAvailMiB != 97 {
		t.Errorf("memavail: %+v %v", s, err)
	}
	for _, bad := range []string{"err no", "ok cpu=1 mem=2 io=3 net=4", "ok cpu=x mem=2 io=3 net=4 cpus=1", ""} {
		if _, err := ParseStatus(bad); err == nil {
			t.Errorf("ParseStatus(%q) accepted", bad)
		}
	}
}

func TestParseTapStats(t *testing.T) {
	out := `[{"ifindex":3,"ifname":"ars-x","stats64":{"rx":{"bytes":1234,"packets":5,"errors":0},"tx":{"bytes":99,"packets":1}}}]`
	c, err := parseTapStats([]byte(out))
	if err != nil {
		t.Fatal(err)
	}
	if c != (TapCounters{RxBytes: 1234, RxPackets: 5, TxBytes: 99, TxPackets: 1}) {
		t.Errorf("got %+v", c)
	}
	if _, err := parseTapStats([]byte(`[]`)); err == nil {
		t.Error("empty list accepted")
	}
}

func TestMacFor(t *testing.T) {
	a, b := macFor("one"), macFor("two")
	if a == b || !strings.HasPrefix(a, "52:54:00:") || len(a) != 17 || macFor("one") != a {
		t.Errorf("macFor: %q %q", a, b)
	}
}

func TestCloseWithoutStart(t *testing.T) {
	v := &VM{Name: "never", exited: make(chan struct{})}
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
}
