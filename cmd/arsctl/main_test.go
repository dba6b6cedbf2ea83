package main

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ars-dev/ars/agent/status"
	"github.com/ars-dev/ars/ipc"
	"github.com/ars-dev/ars/mapper"
)

func TestCommandsAgainstAServer(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "arsd.sock")
	srv := ipc.NewServer(sock, func(ipc.Peer, string) error { return nil }, slog.New(slog.NewTextHandler(io.Discard, nil)))
	srv.Register("vms", func(context.Context, ipc.Peer, json.RawMessage) (any, error) {
		return []status.VM{{Name: "web", PID: 42, AllocMillicores: 750}}, nil
	})
	drm := mapper.New()
	drm.Put(mapper.VM{Name: "web", PID: 42, VCPUs: []mapper.VCPU{{Index: 0, TID: 43}}})
	srv.Register("drm", func(context.Context, ipc.Peer, json.RawMessage) (any, error) { return drm.Snapshot(), nil })
	if err := srv.Listen(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go srv.Serve(ctx)

	var out strings.Builder
	if err := run([]string{"--socket", sock, "vms"}, &out); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "web") || !strings.Contains(out.String(), "0.75") {
		t.Fatalf("vms output:\n%s", out.String())
	}
	out.Reset()
	if err := run([]string{"--socket", sock, "drm"}, &out); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "vm/web/vcpu/0") || !strings.Contains(out.String(), "tid=43") {
		t.Fatalf("drm output:\n%s", out.String())
	}
	drm.Put(mapper.VM{Name: "db", PID: 50})
	out.Reset()
	if err := run([]string{"--socket", sock, "--vm", "db", "drm"}, &out); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "vm/db") || strings.Contains(out.String(), "vm/web") {
		t.Fatalf("drm --vm db output:\n%s", out.String())
	}
	if err := run([]string{"--socket", sock, "--vm", "nope", "drm"}, io.Discard); err == nil {
		t.Fatal("drm --vm of an unknown VM succeeded")
	}
	out.Reset()
	if err := run([]string{"--socket", sock, "--json", "vms"}, &out); err != nil {
		t.Fatal(err)
	}
	var vms []status.VM
	if err := json.Unmarshal([]byte(out.String()), &vms); err != nil || vms[0].PID != 42 {
		t.Fatalf("json: %v %s", err, out.String())
	}
	if err := run([]string{"--socket", sock, "status"}, io.Discard); err == nil || !strings.Contains(err.Error(), "unknown method") {
		t.Fatalf("status on a server without it: %v", err)
	}
	if err := run([]string{"--socket", sock, "bogus"}, io.Discard); err == nil {
		t.Fatal("unknown command accepted")
	}
	if err := run([]string{"--socket", filepath.Join(t.TempDir(), "none"), "vms"}, io.Discard); err == nil ||
		!strings.Contains(err.Error(), "connect to arsd") {
		t.Fatalf("missing socket: %v", err)
	}
}
