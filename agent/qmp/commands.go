package qmp

import (
	"context"

	"github.com/digitalocean/go-qemu/qmp/raw"
)

// CPUInfoFast is one entry of query-cpus-fast, which go-qemu's generated
// API predates. ThreadID is the host thread running the vCPU.
type CPUInfoFast struct {
	CPUIndex int                        `json:"cpu-index"`
	QOMPath  string                     `json:"qom-path"`
	ThreadID int                        `json:"thread-id"`
	Target   string                     `json:"target"`
	Props    *raw.CPUInstanceProperties `json:"props,omitempty"`
}

// QueryCPUsFast runs query-cpus-fast: the vCPUs and their host threads,
// without interrupting the guest.
func (m *Monitor) QueryCPUsFast(ctx context.Context) ([]CPUInfoFast, error) {
	var cpus []CPUInfoFast
	if err := m.Execute(ctx, "query-cpus-fast", nil, &cpus); err != nil {
		return nil, err
	}
	return cpus, nil
}

// QueryStatus runs query-status through go-qemu's typed API with this
// context's deadline.
func (m *Monitor) QueryStatus(ctx context.Context) (raw.StatusInfo, error) {
	var st raw.StatusInfo
	err := m.Execute(ctx, "query-status", nil, &st)
	return st, err
}
