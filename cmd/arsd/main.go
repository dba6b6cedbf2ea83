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
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netns"
	"go.yaml.in/yaml/v3"

	"github.com/ars-dev/ars/agent"
	"github.com/ars-dev/ars/agent/actuator/cgroup"
	"github.com/ars-dev/ars/agent/actuator/tc"
	"github.com/ars-dev/ars/agent/cgroups"
	"github.com/ars-dev/ars/agent/config"
	"github.com/ars-dev/ars/agent/discovery"
	"github.com/ars-dev/ars/agent/executor"
	"github.com/ars-dev/ars/agent/metrics"
	"github.com/ars-dev/ars/agent/status"
	"github.com/ars-dev/ars/agent/telemetry"
	"github.com/ars-dev/ars/ipc"
	"github.com/ars-dev/ars/mapper"
	"github.com/ars-dev/ars/synthesizer"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "arsd:", err)
		os.Exit(1)
	}
}

func run() error {
	var (
		cfgPath     = flag.String("config", "", "YAML config file (default: embedded defaults)")
		qmpDir      = flag.String("qmp-dir", "", "directory of QMP sockets, one per VM (overrides config)")
		ctlSock     = flag.String("control-socket", "", "control socket path (overrides config)")
		metricsAddr = flag.String("metrics-addr", "", "metrics listen address, \"off\" to disable (overrides config)")
		stateDir    = flag.String("state-dir", "", "state directory for the audit log (overrides config)")
		tick        = flag.Duration("tick", 0, "control loop period (overrides config)")
		dryRun      = flag.Bool("dry-run", false, "decide and audit, but write nothing to the host")
		noBPF       = flag.Bool("no-bpf", false, "do not load eBPF programs")
		printCfg    = flag.Bool("print-config", false, "print the effective configuration and exit")
	)
	flag.Parse()
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

	// Each probe loads or fails on its own; a failed one is logged with the
	// verifier's output and reported, and the others keep running.
	tel := telemetry.Open(telemetry.Config{Disable: cfg.Telemetry.Disable,
		SpikeThreshold: cfg.Telemetry.SpikeThreshold, ProgramStats: cfg.Telemetry.ProgramStats}, log)
	defer tel.Close()
	var probes []string
	for _, st := range tel.Status() {
		probes = append(probes, st.String())
	}
	telemetryState := strings.Join(probes, "; ")
	wake := make(chan struct{}, 1)
	if spikes, err := tel.Spikes(); err != nil {
		log.Warn("no early wake-ups on run-queue delay spikes", "err", err)
	} else {
		defer spikes.Close()
		go forwardSpikes(spikes, wake, log)
	}

	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("state dir: %w", err)
	}
	audit, err := executor.OpenAudit(filepath.Join(cfg.StateDir, "audit.log"))
	if err != nil {
		return err
	}
	defer audit.Close()
	if audit.Rotated != "" {
		log.Error("audit log did not verify: moved aside, new chain started", "moved_to", audit.Rotated)
	}

	board := &status.Board{}
	drm := mapper.New()
	// The QMP directory is ARS's own rendezvous point: QEMU (or libvirt
	// hooks) put one socket per VM there. Create it so a fresh host works.
	if err := os.MkdirAll(cfg.QMPDir, 0o750); err != nil {
		return fmt.Errorf("qmp dir: %w", err)
	}
	src := agent.WatcherSource{W: discovery.NewWatcher(cfg.QMPDir, host, discovery.Options{})}
	defer src.Close()
	// The journal holds every write as an intent before it is made. Intents
	// left pending by a crash are closed here: the loop re-reads the host's
	// real state every tick before deciding, so nothing is replayed blindly.
	journal, err := mapper.OpenJournal(filepath.Join(cfg.StateDir, "drm.db"))
	if err != nil {
		return err
	}
	defer journal.Close()
	if pending, err := journal.Pending(); err != nil {
		return err
	} else if len(pending) > 0 {
		var cs []mapper.Completion
		for _, p := range pending {
			log.Warn("action in flight when the previous agent stopped", "seq", p.Seq, "vm", p.VM, "kind", p.Kind,
				"target", p.Target, "value", p.Value)
			cs = append(cs, mapper.Completion{Seq: p.Seq, Outcome: "reconciled", At: time.Now().UTC(),
				Detail: "agent restarted; the host's state is re-read before any new decision"})
		}
		if err := journal.Outcomes(cs); err != nil {
			return err
		}
	}
	// tc on the host's network namespace, where taps live.
	shaper, err := tc.New(netns.None())
	if err != nil {
		return fmt.Errorf("tc: %w", err)
	}
	// One agent per host until active/standby exists: it runs at epoch 1.
	const epoch = 1
	exec := executor.New(executor.Actuators{
		CPU: executor.CgroupActuator{W: cgroup.New(cgroup.Paths{Sys: "/sys"}), Host: host},
		QMP: (&agent.QMPControls{W: src.W}).Get,
		TC:  shaper,
	}, audit, cfg.DryRun, time.Now,
		fmt.Sprintf("arsd[%d]", os.Getpid())).WithJournal(journal)
	exec.SetEpoch(epoch)
	// SLAs set through the control API persist beside the audit log; a bad
	// file is reported and the config's SLAs are used.
	slas, err := agent.NewSLAStore(cfg.DefaultSLA, cfg.VMs, synthesizer.Capacity{}, filepath.Join(cfg.StateDir, "sla.yaml"))
	if err != nil {
		log.Error("SLA overrides not loaded", "err", err)
	}
	loop, err := agent.New(cfg, agent.Deps{
		SLAs: slas,
		VMs: src, Runq: tel, ReadCPU: cgroups.ReadCPU, Exec: exec, Epoch: epoch, Wake: wake,
		AuditRotated: audit.Rotated,
		Audit: func(r executor.Record) error {
			if err := audit.Append(r); err != nil {
				return err
			}
			return audit.Sync()
		},
		DRM: drm, Board: board, Log: log, Now: time.Now,
	}, telemetryState)
	if err != nil {
		return err
	}

	ctl := ipc.NewServer(cfg.ControlSocket, ipc.RootOnly, log)
	registerControl(ctl, controlDeps{Board: board, DRM: drm, SLAs: slas, Log: log})
	if err := ctl.Listen(); err != nil {
		return err
	}
	errc := make(chan error, 2)
	go func() { errc <- ctl.Serve(ctx) }()

	if cfg.MetricsAddr != "" {
		ln, err := net.Listen("tcp", cfg.MetricsAddr)
		if err != nil {
			return fmt.Errorf("metrics: %w", err)
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", metrics.Handler(board, tel))
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

	go func() { errc <- loop.Run(ctx) }()
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
