package agent

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"sort"
	"sync"

	"go.yaml.in/yaml/v3"

	"github.com/ars-dev/ars/internal/atomicfile"
	"github.com/ars-dev/ars/synthesizer"
)

// SLAStore holds the SLAs in force: the config's, overridden per VM by
// `arsctl sla set`. Overrides are persisted (one YAML file, written
// atomically, 0600) so that they survive a restart; a VM's entry in the
// file wins over the config. Every change is validated as part of the
// whole fleet (floors must fit the host's capacity); a rejected change
// leaves what is in force untouched, in memory and on disk. Safe for
// concurrent use (the control API sets, the loop reads).
type SLAStore struct {
	mu        sync.RWMutex
	def       synthesizer.SLA
	config    map[string]synthesizer.SLA
	overrides map[string]synthesizer.SLA
	capacity  synthesizer.Capacity
	path      string
}

// maxOverrideFile bounds the overrides file read at start.
const maxOverrideFile = 4 << 20

// NewSLAStore builds the store from the config's default and per-VM SLAs
// and loads the overrides at path ("" keeps them in memory only). A
// missing file is no error. An unreadable or invalid file is returned as
// an error together with a usable store without the overrides: the agent
// starts on its config and says why.
func NewSLAStore(def synthesizer.SLA, vms map[string]synthesizer.SLA, c synthesizer.Capacity, path string) (*SLAStore, error) {
	s := &SLAStore{def: def, config: map[string]synthesizer.SLA{}, overrides: map[string]synthesizer.SLA{}, capacity: c, path: path}
	for n, v := range vms {
		s.config[n] = v
	}
	if path == "" {
		return s, nil
	}
	b, _, err := slaFormat().Load(path)
	if errors.Is(err, fs.ErrNotExist) {
		return s, nil
	}
	if err != nil {
		return s, fmt.Errorf("sla overrides %s: %w", path, err)
	}
	var ov map[string]synthesizer.SLA
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&ov); err != nil && len(bytes.TrimSpace(b)) > 0 {
		return s, fmt.Errorf("sla overrides %s: %w (ignored; the config's SLAs are in force)", path, err)
	}
	for n := range ov {
		if !synthesizer.ValidVMName(n) {
			return s, fmt.Errorf("sla overrides %s: bad VM name %q (file ignored)", path, n)
		}
	}
	if err := synthesizer.ValidateFleet(s.merged(ov), c); err != nil {
		return s, fmt.Errorf("sla overrides %s: %w (file ignored)", path, err)
	}
	s.overrides = ov
	if s.overrides == nil {
		s.overrides = map[string]synthesizer.SLA{}
	}
	return s, nil
}

// merged is config ∪ overrides (overrides win).
func (s *SLAStore) merged(ov map[string]synthesizer.SLA) map[string]synthesizer.SLA {
	m := make(map[string]synthesizer.SLA, len(s.config)+len(ov))
	for n, v := range s.config {
		m[n] = v
	}
	for n, v := range ov {
		m[n] = v
	}
	return m
}

// For returns the SLA in force for vm and where it comes from: "set"
// (arsctl sla set), "config" or "default".
func (s *SLAStore) For(vm string) (synthesizer.SLA, string) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if v, ok := s.overrides[vm]; ok {
		return v, "set"
	}
	if v, ok := s.config[vm]; ok {
		return v, "config"
	}
	return s.def, "default"
}

// Capacity is the host capacity the fleet is validated against.
func (s *SLAStore) Capacity() synthesizer.Capacity {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.capacity
}

// Named lists the VMs with an explicit SLA (config or set), sorted.
func (s *SLAStore) Named() []string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	m := s.merged(s.overrides)
	out := make([]string, 0, len(m))
	for n := range m {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// Set validates sla for vm against the whole fleet and, if it holds,
// persists it and puts it in force. On any error nothing changes.
func (s *SLAStore) Set(vm string, sla synthesizer.SLA) error {
	if !synthesizer.ValidVMName(vm) {
		return fmt.Errorf("bad VM name %q", vm)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	ov := make(map[string]synthesizer.SLA, len(s.overrides)+1)
	for n, v := range s.overrides {
		ov[n] = v
	}
	ov[vm] = sla
	if err := sla.Validate(); err != nil {
		return fmt.Errorf("vm %s: %w", vm, err)
	}
	if err := synthesizer.ValidateFleet(s.merged(ov), s.capacity); err != nil {
		return err
	}
	if s.path != "" {
		b, err := yaml.Marshal(ov)
		if err != nil {
			return err
		}
		if err := slaFormat().Save(s.path, b, atomicfile.Options{}); err != nil {
			return fmt.Errorf("persist sla: %w", err)
		}
	}
	s.overrides = ov
	return nil
}

// slaFormat is the overrides file's format: YAML under an atomicfile
// header (checksum, version). A headerless file from before headers is
// format 0 and is migrated as is.
func slaFormat() atomicfile.Format {
	return atomicfile.Format{Kind: "sla", Version: 1, Legacy: true, Max: maxOverrideFile,
		Migrate: map[int]atomicfile.Migration{0: func(b []byte) ([]byte, error) { return b, nil }}}
}
