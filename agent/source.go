package agent

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/ars-dev/ars/agent/actuator/qmpact"
	"github.com/ars-dev/ars/agent/executor"
	"github.com/ars-dev/ars/agent/qmp"

	"github.com/ars-dev/ars/agent/discovery"
	"github.com/ars-dev/ars/mapper"
)

// WatcherSource adapts a discovery.Watcher (one open QMP monitor per VM)
// to the loop's VMSource.
type WatcherSource struct{ W *discovery.Watcher }

// Refresh implements VMSource.
func (s WatcherSource) Refresh(ctx context.Context) ([]VM, []error) {
	ch := s.W.Refresh(ctx)
	var out []VM
	for _, v := range s.W.VMs() {
		vm := VM{Name: v.Name, Socket: v.Socket, PID: v.PID, Group: v.Cgroup}
		for _, c := range v.VCPUs {
			vm.VCPUs = append(vm.VCPUs, mapper.VCPU{Index: c.Index, TID: c.TID})
		}
		out = append(out, vm)
	}
	return out, ch.Errors
}

// Close closes every monitor the watcher holds.
func (s WatcherSource) Close() error { return s.W.Close() }

// QMPControls hands the executor one qmpact.Controller per VM, built on
// the monitor the watcher already holds (QEMU serves one QMP client per
// socket) and rebuilt when the VM's monitor changes.
type QMPControls struct {
	W       *discovery.Watcher
	Timeout time.Duration // for building a controller; default 5 s

	mu    sync.Mutex
	cache map[string]qmpControl
}

type qmpControl struct {
	mon  *qmp.Monitor
	ctrl *qmpact.Controller
}

// Get returns the VM's controller, or executor.ErrVanished.
func (q *QMPControls) Get(vm string) (qmpact.VMControl, error) {
	v, ok := q.W.Get(vm)
	if !ok || v.Monitor == nil {
		return nil, fmt.Errorf("%w: %s", executor.ErrVanished, vm)
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.cache == nil {
		q.cache = map[string]qmpControl{}
	}
	if c, ok := q.cache[vm]; ok && c.mon == v.Monitor {
		return c.ctrl, nil
	}
	t := q.Timeout
	if t <= 0 {
		t = 5 * time.Second
	}
	ctx, cancel := context.WithTimeout(context.Background(), t)
	defer cancel()
	ctrl, err := qmpact.NewController(ctx, v.Monitor, qmpact.Options{})
	if err != nil {
		return nil, fmt.Errorf("qmp control of %s: %w", vm, err)
	}
	q.cache[vm] = qmpControl{mon: v.Monitor, ctrl: ctrl}
	return ctrl, nil
}
