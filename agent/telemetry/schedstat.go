package telemetry

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// ReadSchedstat reads procRoot/TID/schedstat, the kernel's own run-queue
// accounting for a thread: time on a CPU, time runnable but waiting, and
// the number of times it was switched in. All three only grow.
func ReadSchedstat(procRoot string, tid int) (onCPUNs, runDelayNs, timeslices uint64, err error) {
	p := filepath.Join(procRoot, strconv.Itoa(tid), "schedstat")
	b, err := os.ReadFile(p)
	if err != nil {
		return 0, 0, 0, fmt.Errorf("schedstat: %w", err)
	}
	f := strings.Fields(string(b))
	if len(f) != 3 {
		return 0, 0, 0, fmt.Errorf("schedstat: %s: want 3 fields, got %q", p, b)
	}
	var v [3]uint64
	for i, s := range f {
		if v[i], err = strconv.ParseUint(s, 10, 64); err != nil {
			return 0, 0, 0, fmt.Errorf("schedstat: %s field %d: %w", p, i+1, err)
		}
	}
	return v[0], v[1], v[2], nil
}

// ReadCtxSwitches reads the voluntary and nonvoluntary context switch
// counts of a thread from procRoot/TID/status.
func ReadCtxSwitches(procRoot string, tid int) (voluntary, nonvoluntary uint64, err error) {
	p := filepath.Join(procRoot, strconv.Itoa(tid), "status")
	b, err := os.ReadFile(p)
	if err != nil {
		return 0, 0, fmt.Errorf("ctx switches: %w", err)
	}
	var haveV, haveN bool
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		var dst *uint64
		switch k {
		case "voluntary_ctxt_switches":
			dst, haveV = &voluntary, true
		case "nonvoluntary_ctxt_switches":
			dst, haveN = &nonvoluntary, true
		default:
			continue
		}
		if *dst, err = strconv.ParseUint(strings.TrimSpace(v), 10, 64); err != nil {
			return 0, 0, fmt.Errorf("ctx switches: %s %s: %w", p, k, err)
		}
	}
	if !haveV || !haveN {
		return 0, 0, fmt.Errorf("ctx switches: %s: no *_ctxt_switches lines", p)
	}
	return voluntary, nonvoluntary, nil
}

// KernelSample is the kernel's own accounting for one thread at one moment.
type KernelSample struct {
	OnCPUNs, RunDelayNs, Timeslices uint64 // procRoot/TID/schedstat
	Nonvoluntary                    uint64 // procRoot/TID/status nonvoluntary_ctxt_switches
}

// ReadKernelSample reads schedstat and the nonvoluntary switch count of tid.
func ReadKernelSample(procRoot string, tid int) (KernelSample, error) {
	var k KernelSample
	var err error
	if k.OnCPUNs, k.RunDelayNs, k.Timeslices, err = ReadSchedstat(procRoot, tid); err != nil {
		return k, err
	}
	if _, k.Nonvoluntary, err = ReadCtxSwitches(procRoot, tid); err != nil {
		return k, err
	}
	return k, nil
}
