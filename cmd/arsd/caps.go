package main

// Least privilege at start: read the capabilities arsd holds and turn off,
// with a log line naming the missing capability, each feature they do not
// cover (agent/caps).

import (
	"log/slog"

	"github.com/ars-dev/ars/agent/caps"
	"github.com/ars-dev/ars/agent/config"
	"github.com/ars-dev/ars/agent/telemetry"
)

// checkCapabilities logs every feature the effective capability set turns
// off and adjusts cfg so arsd does not try them: no eBPF probes without
// CAP_BPF+CAP_PERFMON (or CAP_SYS_ADMIN), no BPF run-time statistics
// without CAP_SYS_ADMIN. Network shaping is left to the caller (no tc
// actuator without CAP_NET_ADMIN).
func checkCapabilities(cfg *config.Config, log *slog.Logger) (caps.Report, error) {
	p, err := caps.Read("/proc")
	if err != nil {
		return nil, err
	}
	r := caps.Check(p)
	off := r.Off()
	for _, s := range off {
		log.Warn("feature off", "feature", string(s.Feature), "needs", s.Needs, "why", s.Why)
	}
	if len(off) == 0 {
		log.Info("capabilities", "effective", p.Effective.String(), "features", r.Summary())
	}
	if !r.On(caps.EBPF) {
		cfg.Telemetry.Disable = append([]string(nil), telemetry.Probes...)
	}
	if !r.On(caps.ProgramStats) {
		cfg.Telemetry.ProgramStats = false
	}
	return r, nil
}
