package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// findPort returns the /dev path of the virtio-serial port called name,
// creating the device node from sysfs when devtmpfs has not (no udev here).
func findPort(sys, dev, name string) (string, error) {
	dirs, err := filepath.Glob(filepath.Join(sys, "class/virtio-ports/*"))
	if err != nil {
		return "", err
	}
	for _, d := range dirs {
		b, err := os.ReadFile(filepath.Join(d, "name"))
		if err != nil || strings.TrimSpace(string(b)) != name {
			continue
		}
		node := filepath.Join(dev, filepath.Base(d))
		if _, err := os.Stat(node); err == nil {
			return node, nil
		}
		mm, err := os.ReadFile(filepath.Join(d, "dev"))
		if err != nil {
			return "", fmt.Errorf("port %s: %w", name, err)
		}
		major, minor, err := parseDevNum(strings.TrimSpace(string(mm)))
		if err != nil {
			return "", fmt.Errorf("port %s: %w", name, err)
		}
		if err := syscall.Mknod(node, syscall.S_IFCHR|0o600, int(mkdev(major, minor))); err != nil && !errors.Is(err, os.ErrExist) {
			return "", fmt.Errorf("mknod %s: %w", node, err)
		}
		return node, nil
	}
	return "", fmt.Errorf("no virtio-serial port named %q", name)
}

func parseDevNum(s string) (major, minor uint64, err error) {
	a, b, ok := strings.Cut(s, ":")
	if !ok {
		return 0, 0, fmt.Errorf("bad dev number %q", s)
	}
	if major, err = strconv.ParseUint(a, 10, 32); err != nil {
		return 0, 0, fmt.Errorf("bad dev number %q", s)
	}
	if minor, err = strconv.ParseUint(b, 10, 32); err != nil {
		return 0, 0, fmt.Errorf("bad dev number %q", s)
	}
	return major, minor, nil
}

// mkdev encodes a Linux dev_t like glibc's makedev.
func mkdev(major, minor uint64) uint64 {
	return (minor & 0xff) | (major&0xfff)<<8 | (minor&^0xff)<<12 | (major&^0xfff)<<32
}

// servePort answers commands on a virtio-serial port until ctx ends.
//
// virtio_console semantics shape this loop: read returns 0 while no host
// client is connected (so we back off instead of spinning), and a blocking
// write would wait until some later client connects and then deliver a stale
// reply to it. The port is therefore non-blocking, and a reply that cannot
// be written within a second is dropped.
func servePort(ctx context.Context, path string, handle func(string) string, logf func(string, ...any)) error {
	fd, err := syscall.Open(path, syscall.O_RDWR|syscall.O_NONBLOCK|syscall.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", path, err)
	}
	defer syscall.Close(fd)
	var pending []byte
	buf := make([]byte, 4096)
	for ctx.Err() == nil {
		if !waitReadable(fd, 500*time.Millisecond) {
			continue
		}
		n, err := syscall.Read(fd, buf)
		switch {
		case err == syscall.EAGAIN || err == syscall.EINTR:
			continue
		case err != nil:
			logf("read %s: %v", path, err)
			time.Sleep(time.Second)
			continue
		case n == 0:
			// No host client. Forget any half line of the last one.
			pending = pending[:0]
			time.Sleep(100 * time.Millisecond)
			continue
		}
		pending = append(pending, buf[:n]...)
		for {
			i := bytes.IndexByte(pending, '\n')
			if i < 0 {
				break
			}
			line := strings.TrimRight(string(pending[:i]), "\r")
			pending = pending[i+1:]
			if strings.TrimSpace(line) == "" {
				continue
			}
			writeAll(fd, []byte(handle(line)+"\n"))
		}
		if len(pending) > MaxLineLen {
			pending = pending[:0]
			writeAll(fd, []byte("err line longer than "+strconv.Itoa(MaxLineLen)+" bytes\n"))
		}
	}
	return ctx.Err()
}

// waitReadable waits until fd is readable or hung up, or the timeout passes.
func waitReadable(fd int, timeout time.Duration) bool {
	var set syscall.FdSet
	set.Bits[fd/64] |= 1 << (uint(fd) % 64)
	tv := syscall.NsecToTimeval(timeout.Nanoseconds())
	n, err := syscall.Select(fd+1, &set, nil, nil, &tv)
	return err == nil && n > 0
}

func writeAll(fd int, b []byte) {
	deadline := time.Now().Add(time.Second)
	for len(b) > 0 && time.Now().Before(deadline) {
		n, err := syscall.Write(fd, b)
		if n > 0 {
			b = b[n:]
		}
		if err != nil && err != syscall.EAGAIN && err != syscall.EINTR {
			return
		}
		if len(b) > 0 {
			time.Sleep(10 * time.Millisecond)
		}
	}
}

// serveConsole is the fallback channel: lines on the serial console that
// start with "ars:" are commands; replies go back prefixed "ars: ".
func serveConsole(ctx context.Context, path string, handle func(string) string) error {
	f, err := os.OpenFile(path, os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", path, err)
	}
	go func() {
		<-ctx.Done()
		f.Close()
	}()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 4096), MaxLineLen+2)
	for sc.Scan() {
		line := strings.TrimSpace(strings.TrimRight(sc.Text(), "\r"))
		rest, ok := strings.CutPrefix(line, "ars:")
		if !ok {
			continue
		}
		fmt.Fprintf(f, "ars: %s\n", handle(strings.TrimSpace(rest)))
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return sc.Err()
}
