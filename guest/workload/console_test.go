package main

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"
)

// openPTY returns the master of a new pseudo-terminal and its slave path:
// a stand-in for the guest's serial console.
func openPTY(t *testing.T) (*os.File, string) {
	t.Helper()
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Skipf("no pseudo-terminals: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	var unlock int32
	if _, _, e := syscall.Syscall(syscall.SYS_IOCTL, m.Fd(), syscall.TIOCSPTLCK, uintptr(unsafe.Pointer(&unlock))); e != 0 {
		t.Skipf("unlockpt: %v", e)
	}
	var n uint32
	if _, _, e := syscall.Syscall(syscall.SYS_IOCTL, m.Fd(), syscall.TIOCGPTN, uintptr(unsafe.Pointer(&n))); e != 0 {
		t.Skipf("ptsname: %v", e)
	}
	return m, fmt.Sprintf("/dev/pts/%d", n)
}

func TestServeConsole(t *testing.T) {
	master, slave := openPTY(t)
	e, _ := newTestEngine(t, &fakeEnv{cpus: 1, availMiB: 100})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go serveConsole(ctx, slave, e.Handle)
	time.Sleep(100 * time.Millisecond) // let it open the slave

	replies := make(chan string, 16)
	go func() {
		sc := bufio.NewScanner(master)
		for sc.Scan() {
			if l := strings.TrimRight(sc.Text(), "\r"); strings.HasPrefix(l, "ars: ok") || strings.HasPrefix(l, "ars: err") {
				replies <- l
			}
		}
	}()
	// Console noise without the prefix is ignored; prefixed lines are served.
	fmt.Fprint(master, "hello there\nars: cpu 30\nars:status\n")
	for _, want := range []string{"ars: ok cpu=30", "ars: ok cpu=30 mem=0 io=0 net=0 cpus=1 memavail=100"} {
		select {
		case got := <-replies:
			if got != want {
				t.Errorf("reply %q, want %q", got, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("no reply (want %q)", want)
		}
	}
	if got := e.Current().CPU; got != 30 {
		t.Errorf("cpu set-point %d, want 30", got)
	}
}
