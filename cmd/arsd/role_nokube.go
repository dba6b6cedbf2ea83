//go:build !kubernetes

package main

import (
	"errors"
	"log/slog"
)

func (f roleFlags) kubeLeader(*slog.Logger) (leader, error) {
	return nil, errors.New("--lease-backend kubernetes: this arsd was built without it (go build -tags kubernetes ./cmd/arsd)")
}
