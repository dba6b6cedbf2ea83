//go:build linux

package telemetry

// Pinning: with Config.PinDir set, each probe's maps and links are pinned
// under <PinDir>/<probe>-<object hash> on a bpffs (mounted when absent),
// and the next agent re-uses them: the counters and the set of tracked
// threads carry over, and the programs stay attached (and counting)
// while no agent runs. A different object (a new build) gets a new
// directory; the directories of older objects are removed.

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// isBPFFS reports whether dir is on a bpf filesystem.
func isBPFFS(dir string) bool {
	var st unix.Statfs_t
	return unix.Statfs(dir, &st) == nil && uint32(st.Type) == unix.BPF_FS_MAGIC
}

// EnsureBPFFS makes root a directory on a bpffs: if neither root nor its
// parent is on one, a bpffs is mounted on the parent (/sys/fs/bpf for the
// default root /sys/fs/bpf/ars).
func EnsureBPFFS(root string) error {
	parent := filepath.Dir(root)
	if !isBPFFS(root) && !isBPFFS(parent) {
		if err := os.MkdirAll(parent, 0o700); err != nil {
			return fmt.Errorf("bpffs: %w", err)
		}
		// 0711: others may traverse (an unprivileged collector reaches
		// its own directory) but not list.
		if err := unix.Mount("bpf", parent, "bpf", 0, "mode=0711"); err != nil {
			return fmt.Errorf("bpffs: mount on %s: %w", parent, err)
		}
	}
	if err := os.Mkdir(root, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("bpffs: %w", err)
	}
	return nil
}

// pinDir returns (creating it) the directory of probe's objects built
// from obj under root, removing those of other builds of the probe.
func pinDir(root, probe string, obj []byte) (string, error) {
	if root == "" {
		return "", nil
	}
	if err := EnsureBPFFS(root); err != nil {
		return "", err
	}
	sum := sha256.Sum256(obj)
	name := probe + "-" + hex.EncodeToString(sum[:6])
	ents, err := os.ReadDir(root)
	if err != nil {
		return "", fmt.Errorf("bpffs: %w", err)
	}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), probe+"-") && e.Name() != name {
			os.RemoveAll(filepath.Join(root, e.Name())) // unpins a stale build
		}
	}
	dir := filepath.Join(root, name)
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return "", fmt.Errorf("bpffs: %w", err)
	}
	return dir, nil
}

// pinOptions pins every map of spec by name under dir (nil: no pinning).
// An existing compatible pinned map is re-used with its contents.
func pinOptions(spec *ebpf.CollectionSpec, dir string) *ebpf.CollectionOptions {
	if dir == "" {
		return nil
	}
	for _, m := range spec.Maps {
		m.Pinning = ebpf.PinByName
		// bpffs refuses names with a dot: .bss (the globals) is pinned
		// as bss, so a re-used program and the agent share it too.
		// The loader makes data sections mmapable by their name; keep that.
		if strings.HasPrefix(m.Name, ".") {
			m.Flags |= unix.BPF_F_MMAPABLE
		}
		m.Name = strings.ReplaceAll(strings.TrimPrefix(m.Name, "."), ".", "_")
	}
	return &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: dir}}
}

// attach attaches prog (tp_btf). With a pin directory, a link pinned by a
// previous agent is re-used (its program has kept running since), and a
// new link is pinned for the next agent.
func attach(dir, name string, prog *ebpf.Program) (link.Link, error) {
	if dir != "" {
		p := filepath.Join(dir, "link_"+name)
		if l, err := link.LoadPinnedLink(p, nil); err == nil {
			return l, nil
		} else if !errors.Is(err, fs.ErrNotExist) {
			os.Remove(p) // unusable; replaced below
		}
		l, err := link.AttachTracing(link.TracingOptions{Program: prog, AttachType: ebpf.AttachTraceRawTp})
		if err != nil {
			return nil, err
		}
		if err := l.Pin(p); err != nil {
			return nil, errors.Join(fmt.Errorf("pin link %s: %w", name, err), l.Close())
		}
		return l, nil
	}
	return link.AttachTracing(link.TracingOptions{Program: prog, AttachType: ebpf.AttachTraceRawTp})
}

// Unpin removes everything pinned under root (the operator's reset, and
// test cleanup): the programs detach when no agent holds them.
func Unpin(root string) error {
	if root == "" {
		return nil
	}
	if err := os.RemoveAll(root); err != nil {
		return fmt.Errorf("bpffs: %w", err)
	}
	return nil
}
