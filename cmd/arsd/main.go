// Command arsd is the ARS host agent: it discovers the QEMU VMs on this
// host, watches them (cgroups, eBPF), forecasts their demand and adjusts
// their CPU quota within their SLA. It serves Prometheus metrics and a Unix
// control socket for arsctl. With no flags it runs on embedded defaults.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"syscall"
	"time"

	"github.com/vishvananda/netns"
	"go.yaml.in/yaml/v3"

	"github.com/ars-dev/ars/agent"
	"github.com/ars-dev/ars/agent/actuator/cgroup"
	"github.com/ars-dev/ars/agent/actuator/tc"
	"github.com/ars-dev/ars/agent/authz"
	"github.com/ars-dev/ars/agent/caps"
	"github.com/ars-dev/ars/agent/cgroups"
	"github.com/ars-dev/ars/agent/config"
	"github.com/ars-dev/ars/agent/discovery"
	"github.com/ars-dev/ars/agent/executor"
	"github.com/ars-dev/ars/agent/metrics"
	"github.com/ars-dev/ars/agent/replica"
	"github.com/ars-dev/ars/agent/status"
	"github.com/ars-dev/ars/agent/telemetry"
	"github.com/ars-dev/ars/mapper"
	"github.com/ars-dev/ars/synthesizer"
)

func main() {
	// arsd's work is I/O-bound and ticks once a second; with more than one
	// P the Go scheduler spins idle threads looking for work at every
	// wake-up, which cost more than the work itself (10 VMs: 1.07-1.33 %
	// of a core with GOMAXPROCS=2, 0.73 % with 1; docs/BENCHMARKS.md).
	// The GOMAXPROCS environment variable still overrides this.
	if os.Getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(1)
	}
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "arsd:", err)
		os.Exit(1)
	}
}

func run() error {
	if len(os.Args) > 1 && os.Args[1] == collectorSubcommand {
		return runCollector(os.Args[2:])
	}
	var (
		cfgPath     = flag.String("config", "", "YAML config file (default: embedded defaults)")
		qmpDir      = flag.String("qmp-dir", "", "directory of QMP sockets, one per VM (overrides config)")
		ctlSock     = flag.String("control-socket", "", "control socket path (overrides config)")
		ctlPolicy   = flag.String("control-policy", "", "control API policy file (overrides config; default: root only)")
		metricsAddr = flag.String("metrics-addr", "", "metrics listen address, \"off\" to disable (overrides config)")
		stateDir    = flag.String("state-dir", "", "state directory for the audit log (overrides config)")
		tick        = flag.Duration("tick", 0, "control loop period (overrides config)")
		dryRun      = flag.Bool("dry-run", false, "decide and audit, but write nothing to the host")
		noBPF       = flag.Bool("no-bpf", false, "do not load eBPF programs")
		printCfg    = flag.Bool("print-config", false, "print the effective configuration and exit")
		collectorM  = flag.String("collector", "split", "eBPF telemetry: split (a collector process keeping only CAP_BPF and CAP_PERFMON) or inprocess")
		rf          = registerRoleFlags()
	)
	flag.Parse()
	if err := rf.validate(); err != nil {
		return err
	}
	if flag.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", flag.Args())
	}
	cfg := config.Default()
	if *cfgPath != "" {
		var err error
		if cfg, err = config.Load(*cfgPath); err != nil {
			return err
		}
	}
	if *qmpDir != "" {
		cfg.QMPDir = *qmpDir
	}
	if *ctlSock != "" {
		cfg.ControlSocket = *ctlSock
	}
	if *ctlPolicy != "" {
		cfg.ControlPolicy = *ctlPolicy
	}
	switch *metricsAddr {
	case "":
	case "off":
		cfg.MetricsAddr = ""
	default:
		cfg.MetricsAddr = *metricsAddr
	}
	if *stateDir != "" {
		cfg.StateDir = *stateDir
	}
	if *tick != 0 {
		cfg.Tick = *tick
	}
	if *dryRun {
		cfg.DryRun = true
	}
	if *noBPF {
		cfg.Telemetry.Disable = append([]string(nil), telemetry.Probes...)
	}
	if *collectorM != "split" && *collectorM != "inprocess" {
		return fmt.Errorf("--collector %q: want split or inprocess", *collectorM)
	}
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("invalid configuration: %w", err)
	}
	if *printCfg {
		return yaml.NewEncoder(os.Stdout).Encode(cfg)
	}

	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	host, err := cgroups.Detect(cgroups.DefaultPaths())
	if err != nil {
		return err
	}
	log.Info("cgroups", "cpu", host.VersionOf("cpu").String(), "cpuacct", host.VersionOf("cpuacct").String())

	// Least privilege: say which feature the capabilities we hold turn off.
	capReport, err := checkCapabilities(&cfg, log)
	if err != nil {
		return err
	}
	// Each probe loads or fails on its own; a failed one is logged with the
	// verifier's output and reported, and the others keep running.
	// Split (default): a collector process holds the probes (collector.go).
	tel, wake, telemetryState, closeTel := openTelemetry(ctx, *collectorM, telemetry.Config{Disable: cfg.Telemetry.Disable,
		SpikeThreshold: cfg.Telemetry.SpikeThreshold, ProgramStats: cfg.Telemetry.ProgramStats,
		PinDir: rf.preparePinDir(log)}, log)
	defer closeTel()
	if len(capReport.Off()) > 0 {
		telemetryState += "; " + capReport.Summary()
	}

	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("state dir: %w", err)
	}
	// The journal holds every write as an intent before it is made. Intents
	// left pending by a crash are closed below: the loop re-reads the host's
	// real state every tick before deciding, so nothing is replayed blindly.
	// It also anchors the audit chain: the tip it recorded must still be in
	// the audit log, so a log whose tail was cut (with its head file
	// rewritten to match) does not verify either.
	journal, journalMoved, err := openJournal(filepath.Join(cfg.StateDir, "drm.db"), log, time.Now)
	if err != nil {
		return err
	}
	defer journal.Close()
	var anchor *executor.Head
	if h, ok, err := journal.AuditHead(); err != nil {
		log.Error("audit anchor in the journal unreadable; the log is checked on its own", "err", err)
	} else if ok {
		anchor = &executor.Head{Seq: h.Seq, Hash: h.Hash}
	}
	audit, err := executor.OpenAuditAnchored(filepath.Join(cfg.StateDir, "audit.log"), anchor)
	if err != nil {
		return err
	}
	defer audit.Close()
	if audit.Rotated != "" {
		log.Error("audit log did not verify: moved aside, new chain started", "moved_to", audit.Rotated)
	}
	audit.OnSync = func(h executor.Head) error { return journal.SetAuditHead(mapper.AuditHead{Seq: h.Seq, Hash: h.Hash}) }
	if h := audit.Head(); h.Seq > 0 {
		if err := audit.OnSync(h); err != nil {
			return fmt.Errorf("journal: record the audit anchor: %w", err)
		}
	}
	// One audit function for the loop and the control API.
	auditRecord := func(r executor.Record) error {
		if err := audit.Append(r); err != nil {
			return err
		}
		return audit.Sync()
	}

	board := &status.Board{}
	roleSt := &roleState{}
	drm := mapper.New()
	// The QMP directory is ARS's own rendezvous point: QEMU (or libvirt
	// hooks) put one socket per VM there. Create it so a fresh host works.
	if err := os.MkdirAll(cfg.QMPDir, 0o750); err != nil {
		return fmt.Errorf("qmp dir: %w", err)
	}
	if err := checkQMPDir(cfg.QMPDir, log); err != nil {
		return err
	}
	src := agent.WatcherSource{W: discovery.NewWatcher(cfg.QMPDir, host, discovery.Options{})}
	defer src.Close()
	if _, err := recoverJournal(journal, log, time.Now, audit.Append); err != nil {
		return err
	}
	// tc on the host's network namespace, where taps live.
	// Without CAP_NET_ADMIN there is no tc actuator: network actions are
	// reported as unsupported instead of failing with EPERM.
	var shaper tc.Shaper
	if capReport.On(caps.NetShaping) {
		nl, err := tc.New(netns.None())
		if err != nil {
			return fmt.Errorf("tc: %w", err)
		}
		shaper = nl
	}
	// One controller per VM's QMP monitor, shared by the loop (balloon and
	// guest memory statistics) and the executor (writes).
	qmpControls := &agent.QMPControls{W: src.W}
	// Leadership: the lease decides whether this agent is the active one
	// (the only writer) and under which epoch; see role.go.
	leasePath := rf.leasePath(cfg.ControlSocket)
	lse, err := rf.newLeader(cfg.ControlSocket, cfg.StateDir, log)
	if err != nil {
		return err
	}
	exec := executor.New(executor.Actuators{
		CPU: executor.CgroupActuator{W: cgroup.New(cgroup.Paths{Sys: "/sys"}), Host: host},
		QMP: qmpControls.Get,
		TC:  shaper,
	}, audit, cfg.DryRun, time.Now,
		fmt.Sprintf("arsd[%d]", os.Getpid())).WithJournal(journal).WithFence(leaseFence(lse))
	// SLAs set through the control API persist beside the audit log; a bad
	// file is reported and the config's SLAs are used.
	capacity, err := agent.HostCapacity(cfg.Capacity, "/proc/meminfo")
	if err != nil {
		return fmt.Errorf("host capacity: %w", err)
	}
	if err := synthesizer.ValidateFleet(cfg.VMs, capacity); err != nil {
		return fmt.Errorf("invalid SLAs for this host (capacity cpu %dm, memory %d MiB allocatable): %w",
			capacity.Allocatable(synthesizer.CPU), capacity.Allocatable(synthesizer.Memory), err)
	}
	log.Info("host capacity", "cpu_millicores", capacity.CPU.Total, "cpu_reserved", capacity.CPU.Reserved,
		"memory_mib", capacity.Memory.Total, "memory_reserved", capacity.Memory.Reserved)
	slas, err := agent.NewSLAStore(cfg.DefaultSLA, cfg.VMs, capacity, filepath.Join(cfg.StateDir, "sla.yaml"))
	if err != nil {
		log.Error("SLA overrides not loaded", "err", err)
	}
	policy := authz.RootOnly()
	if cfg.ControlPolicy != "" {
		if policy, err = authz.Load(cfg.ControlPolicy, authz.OSResolver{}); err != nil {
			return err
		}
	}
	log.Info("control policy", "source", policy.Source(), "grants", policy.Summary(), "socket_shared", policy.Shared())
	ctl, api := newControlServer(cfg.ControlSocket, controlDeps{Board: board, DRM: drm, SLAs: slas, Log: log,
		Policy: policy, Audit: auditRecord,
		Epoch: func() uint64 { roleSt.mu.Lock(); defer roleSt.mu.Unlock(); return roleSt.epoch }})
	if err := ctl.Listen(); err != nil {
		return err
	}
	errc := make(chan error, 2)
	go func() { errc <- ctl.Serve(ctx) }()
	go api.reloadOnHUP(ctx, ctl, cfg.ControlPolicy)
	go serveTop(ctx, topSocketPath(cfg.ControlSocket), board, log) // arsctl top (collector.go)

	if cfg.MetricsAddr != "" {
		ln, err := net.Listen("tcp", cfg.MetricsAddr)
		if err != nil {
			return fmt.Errorf("metrics: %w", err)
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", metrics.Handler(board, tel, roleSt))
		mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
		srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go func() {
			if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("metrics: %w", err)
			}
		}()
		defer srv.Close()
		log.Info("metrics", "addr", ln.Addr().String())
	}
	log.Info("arsd running", "qmp_dir", cfg.QMPDir, "control_socket", cfg.ControlSocket,
		"tick", cfg.Tick, "dry_run", cfg.DryRun, "telemetry", telemetryState)

	rs := &roles{role: *rf.role, lease: lse, exec: exec, state: roleSt, log: log, stepDown: func() { src.Close() }}
	if p := rf.replPath(leasePath); p != "" {
		rs.follower = &replica.Follower{Path: p, Log: log}
		roleSt.follower = rs.follower
		rs.publish = &replica.Publisher{Path: p, Holder: lse.Holder(), Log: log,
			State: func() (uint64, mapper.Snapshot, executor.Head) { return exec.Epoch(), drm.Snapshot(), audit.Head() }}
	}
	rs.act = func(ctx context.Context, epoch uint64, lost func(error)) error {
		loop, err := agent.New(cfg, agent.Deps{
			SLAs: slas, Capacity: capacity, QMP: qmpControls.Get,
			VMs: src, Runq: tel, ReadCPU: cgroups.ReadCPU, Exec: &fencedExec{inner: exec, lease: lse, lost: lost, log: log}, Epoch: epoch, Wake: wake,
			AuditRotated: audit.Rotated, JournalRotated: journalMoved, Audit: auditRecord,
			DRM: drm, Board: board, Log: log, Now: time.Now,
		}, telemetryState)
		if err != nil {
			return err
		}
		return loop.Run(ctx)
	}
	go func() { errc <- rs.run(ctx) }()
	select {
	case <-ctx.Done():
		log.Info("arsd stopping")
		return nil
	case err := <-errc:
		return err
	}
}

// forwardSpikes turns run-queue delay spike events into (coalesced) early
// wake-ups of the control loop, until the reader is closed.
func forwardSpikes(r *telemetry.SpikeReader, wake chan<- struct{}, log *slog.Logger) {
	for {
		sp, err := r.Read()
		if err != nil {
			if !errors.Is(err, telemetry.ErrClosed) {
				log.Warn("spike reader stopped", "err", err)
			}
			return
		}
		log.Debug("run-queue delay spike", "tid", sp.TID, "vm_slot", sp.VMSlot, "delay", sp.Delay)
		select {
		case wake <- struct{}{}:
		default: // a wake-up is already pending
		}
	}
}
