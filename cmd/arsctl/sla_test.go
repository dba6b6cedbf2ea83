package main

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"

	"github.com/ars-dev/ars/ipc"
	"github.com/ars-dev/ars/synthesizer"
)

// fakeSLAServer serves sla.get/sla.set from a map, refusing VM "locked".
func fakeSLAServer(t *testing.T) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "arsd.sock")
	srv := ipc.NewServer(sock, func(ipc.Peer, string) error { return nil }, slog.New(slog.NewTextHandler(io.Discard, nil)))
	slas := map[string]string{"web": "cpu:\n    floorMillicores: 200\n    ceilingMillicores: 1000\n"}
	srv.Register("sla.get", func(_ context.Context, _ ipc.Peer, p json.RawMessage) (any, error) {
		var in struct{ VM string }
		if err := ipc.DecodeParams(p, &in); err != nil {
			return nil, err
		}
		return slaView{VM: in.VM, Source: "config", SLA: slas[in.VM]}, nil
	})
	srv.Register("sla.set", func(_ context.Context, _ ipc.Peer, p json.RawMessage) (any, error) {
		var in struct{ VM, SLA string }
		if err := ipc.DecodeParams(p, &in); err != nil {
			return nil, err
		}
		if in.VM == "locked" {
			return nil, errors.New("permission denied: uid 1000 (gid 1000) does not own VM locked")
		}
		var s synthesizer.SLA
		if err := yaml.Unmarshal([]byte(in.SLA), &s); err != nil {
			return nil, err
		}
		before := slas[in.VM]
		slas[in.VM] = in.SLA
		return slaView{VM: in.VM, Source: "set", SLA: in.SLA, Before: before}, nil
	})
	if err := srv.Listen(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { srv.Serve(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return sock
}

func TestSLACommands(t *testing.T) {
	sock := fakeSLAServer(t)
	var out strings.Builder
	if err := run([]string{"--socket", sock, "sla", "get", "web"}, &out); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "floorMillicores: 200") || !strings.Contains(out.String(), "from config") {
		t.Fatalf("get:\n%s", out.String())
	}
	out.Reset()
	if err := run([]string{"--socket", sock, "sla", "get", "web", "--json"}, &out); err != nil {
		t.Fatal(err)
	}
	var v slaView
	if err := json.Unmarshal([]byte(out.String()), &v); err != nil || v.Source != "config" {
		t.Fatalf("get --json: %v %s", err, out.String())
	}
	file := filepath.Join(t.TempDir(), "sla.yaml")
	os.WriteFile(file, []byte("cpu: {floorMillicores: 300, ceilingMillicores: 1200}\n"), 0o600)
	out.Reset()
	if err := run([]string{"--socket", sock, "sla", "set", "web", "--file", file}, &out); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "SLA set") || !strings.Contains(out.String(), "floorMillicores: 300") {
		t.Fatalf("set:\n%s", out.String())
	}
	out.Reset()
	if err := run([]string{"--socket", sock, "sla", "set", "--cpu-ceiling", "1500", "web"}, &out); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "ceilingMillicores: 1500") || !strings.Contains(out.String(), "floorMillicores: 300") {
		t.Fatalf("set --cpu-ceiling:\n%s", out.String())
	}
	for name, args := range map[string][]string{
		"no verb":         {"sla"},
		"bad verb":        {"sla", "del", "web"},
		"no vm":           {"sla", "get"},
		"two vms":         {"sla", "get", "a", "b"},
		"nothing to set":  {"sla", "set", "web"},
		"file and bounds": {"sla", "set", "web", "--file", file, "--cpu-floor", "1"},
		"get with file":   {"sla", "get", "web", "--file", file},
		"missing file":    {"sla", "set", "web", "--file", filepath.Join(t.TempDir(), "none")},
		"unknown flag":    {"sla", "get", "web", "--nope"},
	} {
		if err := run(append([]string{"--socket", sock}, args...), io.Discard); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	err := run([]string{"--socket", sock, "sla", "set", "locked", "--file", file}, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "permission denied") {
		t.Fatalf("denied set: %v", err)
	}
}
