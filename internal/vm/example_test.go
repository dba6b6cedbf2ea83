package vm_test

import (
	"context"
	"fmt"
	"log"
	"os"
	"time"

	"github.com/ars-dev/ars/internal/vm"
)

// A demo program boots a guest, loads it and tears it down. It needs root
// and a built guest (make guest).
func Example() {
	dir, err := os.MkdirTemp("", "ars-demo-")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	v, err := vm.Start(ctx, nil, vm.Config{Name: "demo", Dir: dir, MemMiB: 192, Net: true})
	if err != nil {
		log.Fatal(err)
	}
	defer v.Close()
	if err := v.WaitReady(ctx); err != nil {
		log.Fatal(err)
	}
	if err := v.SetLoad(ctx, vm.Load{CPUPercent: 80, MemMiB: 32, NetKbps: 200}); err != nil {
		log.Fatal(err)
	}
	st, err := v.Status(ctx)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("qemu pid %d in %v, tap %s in netns %s: %+v\n", v.PID, v.Cgroup.Dirs, v.Tap, v.NetNS, st)
}
