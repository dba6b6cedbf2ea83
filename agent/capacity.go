package agent

import (
	"bufio"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"

	"github.com/ars-dev/ars/synthesizer"
)

// HostCapacity fills what the config leaves at zero with this host's own
// figures: CPU total = the CPUs this process may run on × 1000 m, with 5 %
// (at least 100 m) reserved for the host; memory total = MemTotal from
// meminfo (a /proc/meminfo path), with 10 % (at least 256 MiB, at most
// half) reserved. Disk and network stay unlimited unless configured: the
// Planner does not drive them live yet. A configured total is kept as is,
// with its configured reservation.
func HostCapacity(configured synthesizer.Capacity, meminfo string) (synthesizer.Capacity, error) {
	c := configured
	if c.CPU.Total == 0 {
		total := int64(runtime.NumCPU()) * 1000
		c.CPU = synthesizer.Quantity{Total: total, Reserved: max(total/20, 100)}
	}
	if c.Memory.Total == 0 {
		kb, err := memTotalKB(meminfo)
		if err != nil {
			return c, fmt.Errorf("host memory: %w", err)
		}
		total := kb >> 10
		c.Memory = synthesizer.Quantity{Total: total, Reserved: min(max(total/10, 256), total/2)}
	}
	return c, c.Validate()
}

func memTotalKB(path string) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) >= 2 && fs[0] == "MemTotal:" {
			v, err := strconv.ParseInt(fs[1], 10, 64)
			if err != nil || v <= 0 {
				return 0, fmt.Errorf("%s: bad MemTotal %q", path, fs[1])
			}
			return v, nil
		}
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, fmt.Errorf("%s: no MemTotal line", path)
}
