// Command workload is the load generator inside ARS's test guest. The
// guest's /init starts it; it follows a load set-point or schedule and takes
// line commands at run time on the virtio-serial port "ars.ctl" (and, as a
// fallback, on the serial console as lines prefixed "ars:").
//
// Commands (one per line; the reply is one line, "ok ..." or "err ..."):
//
//	cpu P            total CPU load, percent of one CPU, spread over online CPUs
//	mem M            keep M MiB allocated and touched
//	io K             write K KiB/s with O_DIRECT to /dev/vda
//	net K            send K kbit/s of UDP to 169.254.100.1:9
//	set k=v,k=v      several of the above at once (keys cpu mem io net)
//	schedule D:k=v,k=v D:k=v ...   run set-points in sequence, hold the last
//	status           ok cpu=.. mem=.. io=.. net=.. cpus=N
//
// A line may start with "@tag "; the reply then starts with the same tag.
// The kernel command line may carry an initial load: ars.set=cpu=50,mem=16
// and ars.schedule=5s:cpu=100;10s:cpu=0 (steps separated by ';').
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

func main() {
	var (
		portName  = flag.String("port", "ars.ctl", "virtio-serial port name to serve")
		console   = flag.String("console", "/dev/ttyS0", "serial console for the ars: fallback (empty: off)")
		disk      = flag.String("disk", "vda", "block device for io load")
		nic       = flag.String("nic", "eth0", "network interface for net load")
		src       = flag.String("src", "169.254.100.2:0", "UDP source address")
		dst       = flag.String("dst", "169.254.100.1:9", "UDP destination (host end of the tap)")
		readyFile = flag.String("ready-file", "/run/ars-workload.ready", "file created once commands are served")
		cmdline   = flag.String("cmdline", "/proc/cmdline", "kernel command line with ars.set= / ars.schedule=")
	)
	flag.Parse()
	logf := func(format string, args ...any) {
		fmt.Fprintf(os.Stdout, "ars-workload: "+format+"\n", args...)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	env := sysEnv{sys: "/sys", proc: "/proc", disk: *disk, nic: *nic}
	cpu := newCPULoad(env)
	mem := &memLoad{}
	dsk := newDiskLoad("/dev/"+*disk, logf)
	nl := newNetLoad(*src, *dst, logf)
	go cpu.Run(ctx)
	go mem.Run(ctx)
	go dsk.Run(ctx)
	go nl.Run(ctx)
	eng := NewEngine(ctx, env, cpu, mem, dsk, nl, logf)

	applyCmdline(eng, *cmdline, logf)

	served := make(chan string, 1)
	go func() {
		delay := 100 * time.Millisecond
		for ctx.Err() == nil {
			path, err := findPort("/sys", "/dev", *portName)
			if err != nil {
				time.Sleep(delay)
				delay = min(2*delay, 2*time.Second)
				continue
			}
			select {
			case served <- path:
			default:
			}
			if err := servePort(ctx, path, eng.Handle, logf); err != nil && ctx.Err() == nil {
				logf("port %s: %v", path, err)
				time.Sleep(time.Second)
			}
		}
	}()
	if *console != "" {
		go func() {
			for ctx.Err() == nil {
				if err := serveConsole(ctx, *console, eng.Handle); err != nil && ctx.Err() == nil {
					logf("console %s: %v", *console, err)
					time.Sleep(5 * time.Second)
				}
			}
		}()
	}

	select {
	case path := <-served:
		logf("serving %s (%s), %d cpus online", *portName, path, env.OnlineCPUs())
	case <-time.After(10 * time.Second):
		logf("no virtio-serial port %q after 10s; console fallback only (still looking)", *portName)
	case <-ctx.Done():
		return
	}
	if *readyFile != "" {
		if err := os.WriteFile(*readyFile, []byte("ready\n"), 0o644); err != nil {
			logf("ready file: %v", err)
		}
	}
	<-ctx.Done()
}

// applyCmdline applies ars.set= and then ars.schedule= from the kernel
// command line, if present.
func applyCmdline(eng *Engine, path string, logf func(string, ...any)) {
	b, err := os.ReadFile(path)
	if err != nil {
		return
	}
	for _, key := range []string{"ars.set", "ars.schedule"} {
		val, ok := cmdlineValue(string(b), key)
		if !ok {
			continue
		}
		verb := strings.TrimPrefix(key, "ars.")
		cmd, err := ParseCommand(verb + " " + val)
		if err != nil {
			logf("%s=%s: %v", key, val, err)
			continue
		}
		logf("%s: %s", key, eng.Do(cmd))
	}
}

// cmdlineValue finds key=value on a kernel command line; the value may be
// double-quoted to hold spaces.
func cmdlineValue(cmdline, key string) (string, bool) {
	s := cmdline
	for {
		s = strings.TrimLeft(s, " \t\n")
		if s == "" {
			return "", false
		}
		var tok string
		end, inQuote := 0, false
		for end < len(s) {
			c := s[end]
			if c == '"' {
				inQuote = !inQuote
			} else if !inQuote && (c == ' ' || c == '\t' || c == '\n') {
				break
			}
			end++
		}
		tok, s = s[:end], s[end:]
		k, v, ok := strings.Cut(tok, "=")
		if ok && k == key {
			return strings.ReplaceAll(v, `"`, ""), true
		}
	}
}
