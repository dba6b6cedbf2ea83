package main

import (
	"context"
	"encoding/json"
	"log/slog"

	"github.com/ars-dev/ars/agent"
	"github.com/ars-dev/ars/agent/status"
	"github.com/ars-dev/ars/ipc"
	"github.com/ars-dev/ars/mapper"
)

// controlDeps is what the control API serves.
type controlDeps struct {
	Board *status.Board
	DRM   *mapper.Table
	SLAs  *agent.SLAStore
	Log   *slog.Logger
}

// registerControl registers the control API's methods on ctl.
func registerControl(ctl *ipc.Server, d controlDeps) {
	ctl.Register("status", func(context.Context, ipc.Peer, json.RawMessage) (any, error) { return d.Board.Latest(), nil })
	ctl.Register("vms", func(context.Context, ipc.Peer, json.RawMessage) (any, error) { return d.Board.Latest().VMs, nil })
	ctl.Register("drm", func(context.Context, ipc.Peer, json.RawMessage) (any, error) { return d.DRM.Snapshot(), nil })
}
