package cgroups

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Owned is a cgroup this process created beneath its own cgroup in each
// controller, for a test or demo VM. House rule: never outside our subtree.
type Owned struct {
	host *Host
	// Dirs maps each controller ("" for cgroup2) to the created directory.
	Dirs map[string]string
	// Rel maps each controller to the path relative to its hierarchy root.
	Rel Membership
}

// CreateUnderSelf makes cgroup <own cgroup>/<name> in each controller
// (v1) and in the unified hierarchy when the controller is served there.
func (h *Host) CreateUnderSelf(name string, controllers ...string) (*Owned, error) {
	if name == "" || strings.ContainsAny(name, "/\x00") || name == "." || name == ".." {
		return nil, fmt.Errorf("cgroups: bad cgroup name %q", name)
	}
	self, err := h.MembershipOf(0)
	if err != nil {
		return nil, err
	}
	o := &Owned{host: h, Dirs: map[string]string{}, Rel: Membership{}}
	for _, c := range controllers {
		key, root := c, ""
		switch h.VersionOf(c) {
		case V1:
			root = h.V1[c]
		case V2:
			key, root = "", h.Unified
		default:
			o.Remove()
			return nil, fmt.Errorf("cgroups: controller %s not available", c)
		}
		if _, done := o.Dirs[key]; done {
			continue
		}
		rel := filepath.Join(self[key], name)
		dir := filepath.Join(root, rel)
		if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			o.Remove()
			return nil, fmt.Errorf("cgroups: mkdir %s: %w", dir, err)
		}
		o.Dirs[key], o.Rel[key] = dir, rel
	}
	return o, nil
}

// AddPID moves pid (all its threads) into every directory of o.
func (o *Owned) AddPID(pid int) error {
	for _, d := range o.Dirs {
		if err := WriteFile(filepath.Join(d, "cgroup.procs"), strconv.Itoa(pid)); err != nil {
			return err
		}
	}
	return nil
}

// Group returns the CPU view of o.
func (o *Owned) Group() (Group, error) { return o.host.groupFrom(o.Rel) }

// Remove deletes the directories, waiting briefly for exiting tasks to leave.
func (o *Owned) Remove() error {
	var errs []error
	for k, d := range o.Dirs {
		var err error
		for i := 0; i < 50; i++ {
			err = os.Remove(d)
			if err == nil || errors.Is(err, os.ErrNotExist) {
				err = nil
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("cgroups: remove %s: %w", d, err))
			continue
		}
		delete(o.Dirs, k)
	}
	return errors.Join(errs...)
}
