package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"syscall"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ars-dev/ars/agent/status"
	"github.com/ars-dev/ars/ipc"
)

// TopSocket is where arsd serves `arsctl top`: beside the control socket.
func topSocket(controlSocket string) string {
	return filepath.Join(filepath.Dir(controlSocket), "top.sock")
}

// top is `arsctl top`: a live view of the VMs, fed by a shared-memory
// ring from arsd (one status snapshot per tick; arsd drops frames for a
// reader that falls behind rather than wait for it).
func top(args []string, controlSocket string, out io.Writer) error {
	fs := flag.NewFlagSet("arsctl top", flag.ContinueOnError)
	once := fs.Bool("once", false, "print one frame and exit (same as -n 1)")
	n := fs.Int("n", 0, "print this many frames and exit (0: until interrupted)")
	sock := fs.String("top-socket", "", "arsd's top socket (default: top.sock beside the control socket)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *once {
		*n = 1
	}
	if *sock == "" {
		*sock = topSocket(controlSocket)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	// arsd runs as root; a look-alike socket from another user is refused.
	c, _, err := ipc.DialRing(dctx, *sock, ipc.RootOnly, ipc.RingConfig{Spin: 64})
	if err != nil {
		return fmt.Errorf("top: %w", err)
	}
	done := make(chan struct{})
	defer close(done)
	go func() {
		select {
		case <-ctx.Done():
			c.Interrupt()
		case <-done:
		}
	}()
	defer c.Close()
	live := *n != 1 && isTerminal(out) // redraw in place; a pipe gets plain frames
	for shown := 0; *n == 0 || shown < *n; {
		b, err := c.ReadFrame()
		if err != nil {
			if errors.Is(err, ipc.ErrRingClosed) && ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, io.EOF) || errors.Is(err, ipc.ErrPeerGone) {
				return errors.New("top: arsd went away")
			}
			return fmt.Errorf("top: %w", err)
		}
		e, err := ipc.DecodeEnvelope(b)
		if err != nil {
			return fmt.Errorf("top: %w", err)
		}
		if e.Type != ipc.FrameStatus {
			continue
		}
		var snap status.Snapshot
		if err := json.Unmarshal(e.Payload, &snap); err != nil {
			return fmt.Errorf("top: malformed snapshot: %w", err)
		}
		if live {
			fmt.Fprint(out, "\x1b[H\x1b[2J") // home, clear
		}
		if err := renderTop(out, snap); err != nil {
			return err
		}
		shown++
	}
	return nil
}

// renderTop prints one frame: a header, one row per VM, open loans.
func renderTop(out io.Writer, s status.Snapshot) error {
	fmt.Fprintf(out, "arsd tick %d at %s   VMs %d   wake-ups %d   drifts %d\n",
		s.Tick, s.Time.Local().Format("15:04:05"), len(s.VMs), s.Wakeups, s.Drifts)
	fmt.Fprintf(out, "telemetry: %s\n", s.Telemetry)
	for _, c := range s.Capacity {
		fmt.Fprintf(out, "capacity %s: %d of %d allocated\n", c.Resource, c.Allocated, c.Allocatable)
	}
	vms := append([]status.VM(nil), s.VMs...)
	sort.Slice(vms, func(i, j int) bool { return vms[i].Name < vms[j].Name })
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "VM\tCLASS\tUSAGE\tDEMAND\tFORECAST\tALLOC\tRUNQ-MEAN\tRUNQ-P99\tBORROWED\tLENT\tDECISION\t")
	for _, v := range vms {
		mean, p99 := "-", "-"
		if v.RunqValid {
			mean, p99 = fmt.Sprintf("%.2fms", v.RunqMeanNs/1e6), fmt.Sprintf("%.2fms", v.RunqP99Ns/1e6)
		}
		fmt.Fprintf(tw, "%s\t%s\t%.2f\t%.2f\t%.2f\t%.2f\t%s\t%s\t%.2f\t%.2f\t%s\t\n", v.Name, v.Class,
			v.UsageMillicores/1000, v.DemandMillicores/1000, v.ForecastMillicores/1000, float64(v.AllocMillicores)/1000,
			mean, p99, float64(v.BorrowedMillicores)/1000, float64(v.LentMillicores)/1000, v.LastDecision)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, l := range s.Loans {
		fmt.Fprintf(out, "loan: %s lends %d %s to %s since %s\n", l.Lender, l.Amount, l.Resource, l.Borrower,
			l.Since.Local().Format("15:04:05"))
	}
	for _, e := range s.Errors {
		fmt.Fprintf(out, "error: %s\n", e)
	}
	return nil
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}
