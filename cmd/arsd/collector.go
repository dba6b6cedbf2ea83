package main

// The collector/engine split (issue 7): `arsd` re-executes itself as the
// hidden subcommand `arsd collector`, which loads the eBPF probes with
// CAP_BPF and CAP_PERFMON only and serves them to the engine over a
// sealed memfd ring (agent/collector). --collector=inprocess keeps the
// telemetry in the engine, as before the split; so does a split that
// fails to start, with an error in the log.

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	osuser "os/user"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/ars-dev/ars/agent"
	"github.com/ars-dev/ars/agent/collector"
	"github.com/ars-dev/ars/agent/status"
	"github.com/ars-dev/ars/agent/telemetry"
	"github.com/ars-dev/ars/ipc"
)

// telemetrySource is what the engine needs of its telemetry, in process
// (*telemetry.Telemetry) or split (*collector.Client).
type telemetrySource interface {
	agent.RunqSource
	agent.VMTracker
	prometheus.Collector
}

// collectorSubcommand is argv[1] of the re-executed collector.
const collectorSubcommand = "collector"

// openTelemetry starts the telemetry in the given mode ("split" or
// "inprocess") and returns it, the spike wake-up channel, a one-line
// state for the status and a function releasing everything.
func openTelemetry(ctx context.Context, mode string, tcfg telemetry.Config, log *slog.Logger) (telemetrySource, <-chan struct{}, string, func()) {
	if mode == "split" {
		args := []string{collectorSubcommand,
			"--disable", strings.Join(tcfg.Disable, ","),
			"--spike-threshold", tcfg.SpikeThreshold.String()}
		if tcfg.ProgramStats {
			args = append(args, "--program-stats")
		}
		if tcfg.PinDir != "" {
			args = append(args, "--pin-dir", tcfg.PinDir)
		}
		if os.Getuid() == 0 {
			args = append(args, "--user", "nobody")
		}
		c, err := collector.Start(ctx, collector.Options{Exe: "/proc/self/exe", Argv0: os.Args[0], Args: args,
			Log: log.With("component", "collector-client")})
		if err == nil {
			state := probeState(c.Status()) + " [split: collector process]"
			return c, c.Wake(), state, func() { c.Close() }
		}
		log.Error("telemetry collector process did not start: falling back to in-process telemetry", "err", err)
	}
	tel := telemetry.Open(tcfg, log)
	wake := make(chan struct{}, 1)
	closers := []func() error{tel.Close}
	if spikes, err := tel.Spikes(); err != nil {
		log.Warn("no early wake-ups on run-queue delay spikes", "err", err)
	} else {
		closers = append([]func() error{spikes.Close}, closers...)
		go forwardSpikes(spikes, wake, log)
	}
	return tel, wake, probeState(tel.Status()) + " [in-process]", func() {
		for _, f := range closers {
			f()
		}
	}
}

func probeState(st []telemetry.ProbeStatus) string {
	var probes []string
	for _, s := range st {
		probes = append(probes, s.String())
	}
	return strings.Join(probes, "; ")
}

// runCollector is `arsd collector`: the telemetry process. The engine
// names an abstract socket to dial; the collector exits when the engine
// hangs up.
func runCollector(args []string) error {
	fs := flag.NewFlagSet("arsd collector", flag.ContinueOnError)
	var (
		disable   = fs.String("disable", "", "comma-separated probes not to load")
		threshold = fs.Duration("spike-threshold", 0, "run-queue delay spike threshold (0: no spikes)")
		progStats = fs.Bool("program-stats", false, "enable BPF run-time statistics")
		pinDir    = fs.String("pin-dir", "", "bpffs directory to pin maps and links in")
		engine    = fs.String("engine-socket", "", "the engine's (abstract) Unix socket to dial")
		user      = fs.String("user", "", "after loading the probes, switch to this user keeping only CAP_BPF and CAP_PERFMON")
	)
	if err := fs.Parse(args); err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo})).
		With("component", "collector", "pid", os.Getpid())
	// The collector lives exactly as long as its engine: a ^C or a
	// systemd stop signals the whole group, and the engine, shutting
	// down, hangs up (or dies: SIGKILL as parent-death signal). Were the
	// collector to exit on the signal, the engine would see it die.
	signal.Ignore(syscall.SIGINT, syscall.SIGTERM)
	ctx := context.Background()

	if *engine == "" {
		return errors.New("collector: --engine-socket is required (arsd starts its collector itself)")
	}
	conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: *engine, Net: "unix"})
	if err != nil {
		return fmt.Errorf("collector: connect to the engine: %w", err)
	}
	defer conn.Close()

	tcfg := telemetry.Config{SpikeThreshold: *threshold, ProgramStats: *progStats, PinDir: *pinDir}
	if *disable != "" {
		tcfg.Disable = strings.Split(*disable, ",")
	}
	// Load and drop on one thread: capability sets are per thread.
	runtime.LockOSThread()
	tel := telemetry.Open(tcfg, log)
	defer tel.Close()
	var spikes collector.SpikeSource
	if sr, err := tel.Spikes(); err == nil {
		spikes = sr
	} else {
		log.Warn("no run-queue delay spike events", "err", err)
	}
	if *user != "" {
		if err := dropPrivileges(*user); err != nil {
			// Never serve with more than we meant to keep.
			return fmt.Errorf("collector: drop privileges: %w", err)
		}
	}
	start := time.Now()
	err = collector.Serve(ctx, conn, collector.EngineIs(os.Getppid()), collector.ServerConfig{
		Backend: tel, Spikes: spikes, Metrics: tel, Probes: tel.Status(), Log: log})
	log.Info("collector stopping", "served", time.Since(start).Round(time.Second), "err", err)
	return err
}

// dropPrivileges runs once the probes are loaded (the BPF objects are
// open fds; reading and updating maps through them needs no capability).
// Every thread switches to user (Go applies set*id to all threads), which
// clears every thread's capabilities; the calling thread, locked since the
// load, keeps CAP_BPF and CAP_PERFMON through PR_SET_KEEPCAPS and capset,
// with its bounding set reduced to those two. Ambient and inheritable
// sets are empty and no_new_privs is set, so nothing the collector could
// execute regains anything.
func dropPrivileges(name string) error {
	u, err := osuser.Lookup(name)
	if err != nil {
		return err
	}
	uid, err1 := strconv.Atoi(u.Uid)
	gid, err2 := strconv.Atoi(u.Gid)
	if err := errors.Join(err1, err2); err != nil {
		return fmt.Errorf("user %s: %w", name, err)
	}
	keep := uint64(1)<<unix.CAP_BPF | uint64(1)<<unix.CAP_PERFMON
	for c := 0; c <= unix.CAP_LAST_CAP; c++ {
		if keep&(1<<uint(c)) == 0 {
			if err := unix.Prctl(unix.PR_CAPBSET_DROP, uintptr(c), 0, 0, 0); err != nil && err != unix.EINVAL {
				return fmt.Errorf("bounding set: drop cap %d: %w", c, err)
			}
		}
	}
	if err := unix.Prctl(unix.PR_SET_KEEPCAPS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("keepcaps: %w", err)
	}
	if err := syscall.Setgroups(nil); err != nil {
		return fmt.Errorf("setgroups: %w", err)
	}
	if err := syscall.Setresgid(gid, gid, gid); err != nil {
		return fmt.Errorf("setresgid %d: %w", gid, err)
	}
	if err := syscall.Setresuid(uid, uid, uid); err != nil {
		return fmt.Errorf("setresuid %d: %w", uid, err)
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	data := [2]unix.CapUserData{
		{Effective: uint32(keep), Permitted: uint32(keep)},
		{Effective: uint32(keep >> 32), Permitted: uint32(keep >> 32)},
	}
	if err := unix.Capset(&hdr, &data[0]); err != nil {
		return fmt.Errorf("capset: %w", err)
	}
	if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0); err != nil {
		return fmt.Errorf("clear ambient: %w", err)
	}
	if err := unix.Prctl(unix.PR_SET_KEEPCAPS, 0, 0, 0, 0); err != nil {
		return fmt.Errorf("keepcaps off: %w", err)
	}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("no_new_privs: %w", err)
	}
	return nil
}

// topSocketPath is where `arsctl top` connects: beside the control socket.
func topSocketPath(controlSocket string) string {
	return filepath.Join(filepath.Dir(controlSocket), "top.sock")
}

// serveTop publishes the status snapshot after every tick to each `arsctl
// top` client on its own ring (ipc.Feed: a slow client skips frames, a
// dead one is dropped; the loop never waits for either). Root only, like
// the control socket's default: a snapshot shows every VM. It returns
// when ctx ends; failures are logged, never fatal to arsd.
func serveTop(ctx context.Context, path string, board *status.Board, log *slog.Logger) {
	srv := ipc.NewRingServer(path, ipc.RootOnly, ipc.RingConfig{Capacity: 1 << 20, Batch: 1}, log)
	if err := srv.Listen(); err != nil {
		log.Error("arsctl top unavailable", "err", err)
		return
	}
	feed := ipc.NewFeed()
	go func() {
		t := time.NewTicker(200 * time.Millisecond)
		defer t.Stop()
		var last uint64
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			s := board.Latest()
			if s.Tick == last || s.Tick == 0 {
				continue
			}
			last = s.Tick
			b, err := json.Marshal(s)
			if err != nil {
				log.Warn("top: encode snapshot", "err", err)
				continue
			}
			feed.Publish(ipc.AppendEnvelope(nil, ipc.Envelope{Type: ipc.FrameStatus,
				Generation: uint64(os.Getpid()), Seq: s.Tick, Payload: b}))
		}
	}()
	if err := srv.Serve(ctx, feed.Serve); err != nil {
		log.Error("arsctl top stopped", "err", err)
	}
}
