package agent

import (
	"context"

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
