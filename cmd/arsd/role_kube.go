//go:build kubernetes

package main

// The Kubernetes lease backend (agent/lease/kubelease) is built only with
// -tags kubernetes: client-go more than doubles the binary, which the
// default host install does not need.

import (
	"crypto/rand"
	"fmt"
	"log/slog"
	"os"

	"github.com/ars-dev/ars/agent/lease/kubelease"
)

func (f roleFlags) kubeLeader(log *slog.Logger) (leader, error) {
	node := os.Getenv("NODE_NAME")
	if node == "" {
		node, _ = os.Hostname()
	}
	name := *f.kubeName
	if name == "" {
		name = "ars-" + node
	}
	var nonce [4]byte
	rand.Read(nonce[:])
	return kubelease.InCluster(kubelease.Config{Namespace: *f.kubeNS, Name: name,
		Identity: fmt.Sprintf("%s/arsd[%d]/%x", node, os.Getpid(), nonce), Log: log})
}
