package executor

import (
	"context"
	"errors"
	"fmt"
	"io/fs"

	"github.com/ars-dev/ars/agent/actuator/cgroup"
	"github.com/ars-dev/ars/agent/cgroups"
)

// CgroupActuator adapts the cgroup actuator (containerd/cgroups, with its
// validation and kernel-accepted write order) to CgroupCPU. arsd uses it;
// Cgroups (plain file writes) remains for tests of the executor alone.
type CgroupActuator struct {
	W    cgroup.Writer
	Host *cgroups.Host
}

func (c CgroupActuator) target(g cgroups.Group) cgroup.Target {
	mount := c.Host.Unified
	if g.CPUVersion == cgroups.V1 {
		mount = c.Host.V1["cpu"]
	}
	return cgroup.Target{Name: g.CPU, CPU: cgroup.Dir{Path: g.CPU, Mount: mount, Version: g.CPUVersion}}
}

func vanished(err error) error {
	if errors.Is(err, cgroup.ErrVanished) {
		return fmt.Errorf("%w: %w", fs.ErrNotExist, err)
	}
	return err
}

// ReadQuota implements CgroupCPU.
func (c CgroupActuator) ReadQuota(g cgroups.Group) (int64, uint64, error) {
	s, err := c.W.Read(context.Background(), c.target(g))
	if err != nil {
		return 0, 0, vanished(err)
	}
	return s.QuotaUs, s.PeriodUs, nil
}

// WriteQuota implements CgroupCPU, keeping the period.
func (c CgroupActuator) WriteQuota(g cgroups.Group, quotaUs int64) error {
	t := c.target(g)
	s, err := c.W.Read(context.Background(), t)
	if err != nil {
		return vanished(err)
	}
	return vanished(c.W.SetCPU(context.Background(), t, quotaUs, s.PeriodUs))
}
