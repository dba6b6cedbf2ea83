package main

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// sysEnv reads the real guest through /sys and /proc.
type sysEnv struct {
	sys, proc, disk, nic string
}

func (e sysEnv) OnlineCPUs() int {
	b, err := os.ReadFile(filepath.Join(e.sys, "devices/system/cpu/online"))
	if err != nil {
		return 1
	}
	n, err := countCPUList(strings.TrimSpace(string(b)))
	if err != nil || n < 1 {
		return 1
	}
	return n
}

// countCPUList counts a kernel CPU list like "0-2,4".
func countCPUList(s string) (int, error) {
	n := 0
	for _, part := range strings.Split(s, ",") {
		if part == "" {
			continue
		}
		lo, hi, isRange := strings.Cut(part, "-")
		a, err := strconv.Atoi(lo)
		if err != nil {
			return 0, fmt.Errorf("cpu list %q: %w", s, err)
		}
		b := a
		if isRange {
			if b, err = strconv.Atoi(hi); err != nil {
				return 0, fmt.Errorf("cpu list %q: %w", s, err)
			}
		}
		if b < a {
			return 0, fmt.Errorf("cpu list %q: bad range", s)
		}
		n += b - a + 1
	}
	return n, nil
}

func (e sysEnv) HasDisk() bool {
	_, err := os.Stat(filepath.Join(e.sys, "class/block", e.disk))
	return err == nil
}

func (e sysEnv) HasNIC() bool {
	_, err := os.Stat(filepath.Join(e.sys, "class/net", e.nic))
	return err == nil
}

func (e sysEnv) MemAvailableMiB() (int, error) {
	f, err := os.Open(filepath.Join(e.proc, "meminfo"))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) >= 2 && f[0] == "MemAvailable:" {
			kb, err := strconv.Atoi(f[1])
			if err != nil {
				return 0, fmt.Errorf("meminfo: %w", err)
			}
			return kb / 1024, nil
		}
	}
	return 0, errors.New("meminfo: no MemAvailable")
}
