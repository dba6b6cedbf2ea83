// Package config owns arsd's configuration: the embedded defaults, loading
// a YAML file over them (unknown keys are errors that name the key), and
// validation with messages that name the offending field. Each component
// owns its own section type; this package only assembles them.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/ars-dev/ars/agent/telemetry"
	"github.com/ars-dev/ars/predictor"
	"github.com/ars-dev/ars/synthesizer"
)

// Config is the whole of arsd's configuration.
type Config struct {
	// QMPDir is scanned for *.sock QMP sockets; each is one VM.
	QMPDir string `yaml:"qmpDir"`
	// ControlSocket is the Unix socket arsctl talks to.
	ControlSocket string `yaml:"controlSocket"`
	// ControlPolicy is the control API's policy file (agent/authz): who
	// may read and change what. "" allows root only.
	ControlPolicy string `yaml:"controlPolicy"`
	// MetricsAddr is where /metrics is served ("" disables it).
	MetricsAddr string `yaml:"metricsAddr"`
	// StateDir holds the audit log.
	StateDir string `yaml:"stateDir"`
	// Tick is the control loop period.
	Tick time.Duration `yaml:"tick"`
	// DryRun computes and audits plans without writing to the host.
	DryRun bool `yaml:"dryRun"`
	// DriftPolicy says what to do with a limit changed behind ARS's back:
	// "repair" (write ARS's decision back within the tick) or "adopt"
	// (take it as the current allocation). Either way it is audited.
	DriftPolicy DriftPolicy `yaml:"driftPolicy"`
	// Telemetry switches eBPF programs.
	Telemetry Telemetry `yaml:"telemetry"`
	// Predictor configures the forecasting model.
	Predictor predictor.Config `yaml:"predictor"`
	// Synthesizer tunes hysteresis and granularity.
	Synthesizer synthesizer.Config `yaml:"synthesizer"`
	// Capacity is what the host hands out; a zero total is read from the
	// host at start (agent.HostCapacity: CPUs and MemTotal, less a
	// reservation for the host).
	Capacity synthesizer.Capacity `yaml:"capacity"`
	// DefaultSLA applies to VMs not listed in VMs.
	DefaultSLA synthesizer.SLA `yaml:"defaultSLA"`
	// VMs holds per-VM SLAs, keyed by VM name.
	VMs map[string]synthesizer.SLA `yaml:"vms"`
}

// DriftPolicy is what ARS does about a limit changed behind its back.
type DriftPolicy string

// Drift policies.
const (
	DriftRepair DriftPolicy = "repair"
	DriftAdopt  DriftPolicy = "adopt"
)

// Telemetry configures the eBPF layer (agent/telemetry).
type Telemetry struct {
	// Disable names probes not to load: sched, faults, blockio, kvmexit.
	Disable []string `yaml:"disable"`
	// SpikeThreshold: a vCPU run-queue delay at or above it wakes the
	// control loop before its next tick; 0 turns spike events off.
	SpikeThreshold time.Duration `yaml:"spikeThreshold"`
	// ProgramStats turns on the kernel's BPF run-time statistics so the
	// metrics carry each program's run count and time (≈20 ns per run of
	// every BPF program on the host while on).
	ProgramStats bool `yaml:"programStats"`
}

// Validate checks probe names and ranges.
func (t Telemetry) Validate() error {
	for _, d := range t.Disable {
		if !slices.Contains(telemetry.Probes, d) {
			return fmt.Errorf("telemetry.disable: unknown probe %q (known: %s)", d, strings.Join(telemetry.Probes, ", "))
		}
	}
	if t.SpikeThreshold < 0 || t.SpikeThreshold > 10*time.Second {
		return fmt.Errorf("telemetry.spikeThreshold must be in [0, 10s], got %v", t.SpikeThreshold)
	}
	return nil
}

// Default returns the embedded defaults: everything arsd needs to run on a
// host with no config file.
func Default() Config {
	return Config{
		QMPDir:        "/run/ars/qmp",
		ControlSocket: "/run/ars/arsd.sock",
		MetricsAddr:   ":9464",
		StateDir:      "/var/lib/ars",
		Tick:          time.Second,
		DriftPolicy:   DriftRepair,
		Telemetry:     Telemetry{SpikeThreshold: 50 * time.Millisecond, ProgramStats: true},
		Predictor:     predictor.DefaultConfig(),
		Synthesizer:   synthesizer.DefaultConfig(),
		DefaultSLA:    synthesizer.DefaultSLA(),
		VMs:           map[string]synthesizer.SLA{},
	}
}

// Load reads path over the defaults and validates the result.
func Load(path string) (Config, error) {
	f, err := os.Open(path)
	if err != nil {
		return Config{}, fmt.Errorf("config: %w", err)
	}
	defer f.Close()
	c, err := Parse(io.LimitReader(f, 1<<20+1))
	if err != nil {
		return Config{}, fmt.Errorf("config %s: %w", path, err)
	}
	return c, nil
}

// Parse decodes YAML over the defaults and validates. Input over 1 MiB is
// refused.
func Parse(r io.Reader) (Config, error) {
	b, err := io.ReadAll(r)
	if err != nil {
		return Config{}, err
	}
	if len(b) > 1<<20 {
		return Config{}, errors.New("larger than 1 MiB")
	}
	c := Default()
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&c); err != nil && !errors.Is(err, io.EOF) {
		return Config{}, err
	}
	// Per-VM SLAs start from the default SLA for fields they leave out.
	if err := c.fillVMDefaults(b); err != nil {
		return Config{}, err
	}
	if err := c.Validate(); err != nil {
		return Config{}, err
	}
	return c, nil
}

// fillVMDefaults re-decodes each VM's SLA over DefaultSLA so omitted fields
// inherit it instead of becoming zero.
func (c *Config) fillVMDefaults(raw []byte) error {
	var doc struct {
		VMs map[string]yaml.Node `yaml:"vms"`
	}
	if err := yaml.Unmarshal(raw, &doc); err != nil {
		return err
	}
	for name, node := range doc.VMs {
		s := c.DefaultSLA
		if err := node.Decode(&s); err != nil {
			return fmt.Errorf("vms.%s: %w", name, err)
		}
		c.VMs[name] = s
	}
	return nil
}

// Validate checks every field and names the one at fault.
func (c Config) Validate() error {
	var errs []error
	if !filepath.IsAbs(c.QMPDir) {
		errs = append(errs, fmt.Errorf("qmpDir must be an absolute path, got %q", c.QMPDir))
	}
	if !filepath.IsAbs(c.ControlSocket) {
		errs = append(errs, fmt.Errorf("controlSocket must be an absolute path, got %q", c.ControlSocket))
	}
	if !filepath.IsAbs(c.StateDir) {
		errs = append(errs, fmt.Errorf("stateDir must be an absolute path, got %q", c.StateDir))
	}
	if c.Tick < 100*time.Millisecond || c.Tick > time.Minute {
		errs = append(errs, fmt.Errorf("tick must be in [100ms, 1m], got %v", c.Tick))
	}
	if c.DriftPolicy != DriftRepair && c.DriftPolicy != DriftAdopt {
		errs = append(errs, fmt.Errorf("driftPolicy must be repair or adopt, got %q", c.DriftPolicy))
	}
	if err := c.Telemetry.Validate(); err != nil {
		errs = append(errs, err)
	}
	if err := c.Predictor.Validate(); err != nil {
		errs = append(errs, fmt.Errorf("predictor: %w", err))
	}
	if err := c.Synthesizer.Validate(); err != nil {
		errs = append(errs, err)
	}
	if err := c.Capacity.Validate(); err != nil {
		errs = append(errs, err)
	}
	if err := c.DefaultSLA.Validate(); err != nil {
		errs = append(errs, fmt.Errorf("defaultSLA: %w", err))
	}
	for name, s := range c.VMs {
		if !synthesizer.ValidVMName(name) {
			errs = append(errs, fmt.Errorf("vms: bad VM name %q", name))
			continue
		}
		if err := s.Validate(); err != nil {
			errs = append(errs, fmt.Errorf("vms.%s: %w", name, err))
		}
	}
	return errors.Join(errs...)
}

// SLAFor returns the SLA of a VM: its own, else the default.
func (c Config) SLAFor(vm string) synthesizer.SLA {
	if s, ok := c.VMs[vm]; ok {
		return s
	}
	return c.DefaultSLA
}
