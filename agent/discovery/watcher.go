package discovery

import (
	"context"
	"errors"
	"slices"
	"sort"
	"sync"

	"github.com/ars-dev/ars/agent/cgroups"
	"github.com/ars-dev/ars/agent/qmp"
)

// Watcher keeps one open monitor per VM in a socket directory and, on each
// Refresh, reconciles them with the directory. It is safe for concurrent
// use; Refresh calls are serialized.
type Watcher struct {
	dir  string
	host *cgroups.Host
	opts Options

	refresh sync.Mutex // one Refresh at a time
	mu      sync.Mutex
	vms     map[string]*held
}

type held struct {
	vm       VM
	dev, ino uint64
}

// Changes is what one Refresh found.
type Changes struct {
	Added   []VM    // new sockets that yielded a VM
	Removed []VM    // VMs whose socket went away or was replaced, or whose QEMU closed the connection; their monitors are closed
	Updated []VM    // VMs whose vCPU set changed (hotplug/unplug)
	Errors  []error // sockets that failed (*SocketError), or the directory listing
}

// NewWatcher watches dir (DefaultDir if ""). host may be nil (no cgroups).
func NewWatcher(dir string, host *cgroups.Host, opts Options) *Watcher {
	if dir == "" {
		dir = DefaultDir
	}
	return &Watcher{dir: dir, host: host, opts: opts.withDefaults(), vms: map[string]*held{}}
}

// Refresh reconciles the held VMs with the directory: VMs still present get
// their vCPUs re-queried; new sockets are probed; vanished ones are closed.
// A directory that cannot be read is reported in Errors and removes nothing.
func (w *Watcher) Refresh(ctx context.Context) Changes {
	w.refresh.Lock()
	defer w.refresh.Unlock()
	var ch Changes
	socks, err := listSockets(w.dir)
	if err != nil {
		ch.Errors = append(ch.Errors, err)
		return ch
	}
	present := map[string]socketEntry{}
	for _, s := range socks {
		present[s.name] = s
	}

	w.mu.Lock()
	names := make([]string, 0, len(w.vms))
	for n := range w.vms {
		names = append(names, n)
	}
	w.mu.Unlock()
	sort.Strings(names)

	for _, n := range names {
		w.mu.Lock()
		h := w.vms[n]
		w.mu.Unlock()
		s, ok := present[n]
		gone := !ok || s.dev != h.dev || s.ino != h.ino || h.vm.Monitor.Err() != nil
		if !gone {
			cpus, err := vcpus(ctx, h.vm.Monitor, procDirOf(w.opts.Paths, h.vm.PID))
			switch {
			case err == nil:
				if !slices.Equal(cpus, h.vm.VCPUs) {
					w.mu.Lock()
					h.vm.VCPUs = cpus
					w.mu.Unlock()
					ch.Updated = append(ch.Updated, h.vm)
				}
				delete(present, n)
				continue
			case errors.Is(err, qmp.ErrDisconnected) || errors.Is(err, qmp.ErrClosed):
				gone = true
			default:
				// Alive but not answering well (e.g. a timeout): keep it.
				ch.Errors = append(ch.Errors, &SocketError{Name: n, Socket: h.vm.Socket, Err: err})
				delete(present, n)
				continue
			}
		}
		h.vm.Monitor.Close()
		w.mu.Lock()
		delete(w.vms, n)
		w.mu.Unlock()
		ch.Removed = append(ch.Removed, h.vm)
		// If the socket was replaced (a new QEMU under the same name), it
		// stays in present and is probed below.
	}

	var todo []socketEntry
	for _, s := range socks {
		if _, ok := present[s.name]; ok {
			todo = append(todo, s)
		}
	}
	vms, errs := probeAll(ctx, todo, w.host, w.opts)
	ch.Errors = append(ch.Errors, errs...)
	byName := map[string]socketEntry{}
	for _, s := range todo {
		byName[s.name] = s
	}
	w.mu.Lock()
	for _, vm := range vms {
		s := byName[vm.Name]
		w.vms[vm.Name] = &held{vm: vm, dev: s.dev, ino: s.ino}
	}
	w.mu.Unlock()
	ch.Added = vms
	return ch
}

// VMs returns the held VMs sorted by name. Their monitors belong to the
// Watcher: use them, do not Close them.
func (w *Watcher) VMs() []VM {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := make([]VM, 0, len(w.vms))
	for _, h := range w.vms {
		out = append(out, h.vm)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Get returns the held VM called name.
func (w *Watcher) Get(name string) (VM, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	h, ok := w.vms[name]
	if !ok {
		return VM{}, false
	}
	return h.vm, true
}

// Close closes every held monitor and forgets the VMs.
func (w *Watcher) Close() error {
	w.refresh.Lock()
	defer w.refresh.Unlock()
	w.mu.Lock()
	defer w.mu.Unlock()
	for n, h := range w.vms {
		h.vm.Monitor.Close()
		delete(w.vms, n)
	}
	return nil
}
