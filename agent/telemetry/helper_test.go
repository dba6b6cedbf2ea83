//go:build linux

package telemetry

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// helperEnv makes the test binary a workload process (TestHelperProcess):
// a separate process the tests track, whose own kernel counters
// (/proc/PID/stat, a loop device's stat) are the ground truth.
const helperEnv = "ARS_TELEMETRY_HELPER"

// TestHelperProcess is not a test: with helperEnv set it reads commands
// from stdin and answers "ok" or "err ..." on stdout:
//
//	touch PAGES          map, write and unmap PAGES fresh anonymous pages
//	io DEV WRITES READS  O_DIRECT 4 KiB writes then reads on block device DEV
func TestHelperProcess(t *testing.T) {
	if os.Getenv(helperEnv) != "1" {
		return // only the re-executed helper process does anything (a pass, not a skip)
	}
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		f := strings.Fields(in.Text())
		var err error
		switch {
		case len(f) == 2 && f[0] == "touch":
			err = helperTouch(atoi(f[1]))
		case len(f) == 4 && f[0] == "io":
			err = helperIO(f[1], atoi(f[2]), atoi(f[3]))
		default:
			err = fmt.Errorf("bad command %q", in.Text())
		}
		if err != nil {
			fmt.Printf("err %v\n", err)
		} else {
			fmt.Println("ok")
		}
	}
	os.Exit(0)
}

func atoi(s string) int { n, _ := strconv.Atoi(s); return n }

func helperTouch(pages int) error {
	size := pages * os.Getpagesize()
	b, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return err
	}
	// One fault per page, not one per huge page.
	_ = unix.Madvise(b, unix.MADV_NOHUGEPAGE)
	for i := 0; i < size; i += os.Getpagesize() {
		b[i] = 1
	}
	return unix.Munmap(b)
}

func helperIO(dev string, writes, reads int) error {
	fd, err := unix.Open(dev, unix.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	const bs = 4096
	raw := make([]byte, 2*bs)
	off := (bs - int(uintptr(unsafe.Pointer(&raw[0]))%bs)) % bs
	buf := raw[off : off+bs] // O_DIRECT wants an aligned buffer
	for i := range buf {
		buf[i] = byte(i)
	}
	for i := 0; i < writes; i++ {
		if _, err := unix.Pwrite(fd, buf, int64(i)*bs); err != nil {
			return fmt.Errorf("write %d: %w", i, err)
		}
	}
	for i := 0; i < reads; i++ {
		if _, err := unix.Pread(fd, buf, int64(i)*bs); err != nil {
			return fmt.Errorf("read %d: %w", i, err)
		}
	}
	return nil
}

// helper is a running helper process.
type helper struct {
	cmd *exec.Cmd
	in  io.WriteCloser
	out *bufio.Scanner
}

func startHelper(t *testing.T) *helper {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), helperEnv+"=1")
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	h := &helper{cmd: cmd, in: in, out: bufio.NewScanner(out)}
	t.Cleanup(func() {
		in.Close()
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill() // by PID
			<-done
		}
	})
	h.do(t, "touch 1") // started and settled
	return h
}

func (h *helper) pid() int { return h.cmd.Process.Pid }

func (h *helper) do(t *testing.T, command string) {
	t.Helper()
	if _, err := fmt.Fprintln(h.in, command); err != nil {
		t.Fatalf("helper %q: %v", command, err)
	}
	if !h.out.Scan() {
		t.Fatalf("helper %q: no answer (%v)", command, h.out.Err())
	}
	if got := h.out.Text(); got != "ok" {
		t.Fatalf("helper %q: %s", command, got)
	}
}

// processTreeOf is pid and its descendants.
func processTreeOf(pid int) []int {
	out := []int{pid}
	for i := 0; i < len(out); i++ {
		for _, tid := range threadsOfPID(out[i]) {
			b, _ := os.ReadFile("/proc/" + strconv.Itoa(out[i]) + "/task/" + strconv.Itoa(int(tid)) + "/children")
			for _, f := range strings.Fields(string(b)) {
				if c, err := strconv.Atoi(f); err == nil {
					out = append(out, c)
				}
			}
		}
	}
	return out
}

func threadsOfPID(pid int) []uint32 {
	ents, _ := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/task")
	var tids []uint32
	for _, e := range ents {
		if n, err := strconv.Atoi(e.Name()); err == nil {
			tids = append(tids, uint32(n))
		}
	}
	return tids
}

// stopGroup stops a command started with Setpgid: SIGTERM to it (stress-ng
// then stops and reaps its workers), SIGKILL to its process group after
// 3 s, and waits.
func stopGroup(cmd *exec.Cmd) {
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(3 * time.Second):
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
	}
	syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) // stragglers of the group, if any
}
