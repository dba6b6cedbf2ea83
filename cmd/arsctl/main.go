// Command arsctl is the operator's client for arsd: it reads the agent's
// state through the control socket.
//
//	arsctl [--socket PATH] [--json] vms     per-VM usage, delay, forecast, allocation
//	arsctl [--socket PATH] [--json] [--vm NAME] drm  the dynamic resource map
//	arsctl [--socket PATH] [--json] status  the whole last snapshot
//	arsctl sla get VM [--json]              the SLA in force for VM, and its source
//	arsctl sla set VM --file sla.yaml       change VM's SLA (or --cpu-floor/--cpu-ceiling)
//	arsctl [--socket PATH] top [--once|-n N] live view of the VMs, fed by a ring from arsd
//	arsctl audit verify [--log FILE]        check the audit log's hash chain
//	arsctl backtest --trace PATH --resource cpu|mem|disk|net --target-violation 0.02 --out FILE [--model NAME]
//	                                         replay a trace through the predictor's models
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"text/tabwriter"
	"time"

	"github.com/ars-dev/ars/agent/config"
	"github.com/ars-dev/ars/agent/status"
	"github.com/ars-dev/ars/ipc"
	"github.com/ars-dev/ars/mapper"
)

func main() {
	if err := run(os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "arsctl:", err)
		os.Exit(1)
	}
}

func run(args []string, out io.Writer) error {
	fs := flag.NewFlagSet("arsctl", flag.ContinueOnError)
	sock := fs.String("socket", config.Default().ControlSocket, "arsd control socket")
	asJSON := fs.Bool("json", false, "print raw JSON")
	vmName := fs.String("vm", "", "drm: only this VM")
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "usage: arsctl [--socket PATH] [--json] [--vm NAME] vms|drm|status\n       arsctl sla get VM [--json] | sla set VM --file sla.yaml\n       arsctl [--socket PATH] top [--once | -n N]  live view of the VMs (ring from arsd)\n       arsctl audit verify [--log FILE]\n       arsctl backtest --trace PATH --resource cpu|mem|disk|net --target-violation 0.02 --out FILE [--model NAME]")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() >= 1 && fs.Arg(0) == "backtest" {
		return backtest(fs.Args()[1:], out)
	}
	if fs.NArg() >= 1 && fs.Arg(0) == "sla" {
		return slaCmd(fs.Args()[1:], *sock, *asJSON, os.Stdin, out)
	}
	if fs.NArg() >= 1 && fs.Arg(0) == "audit" {
		return auditCmd(fs.Args()[1:], out)
	}
	if fs.NArg() >= 1 && fs.Arg(0) == "simulate" {
		return simulate(fs.Args()[1:], out)
	}
	if fs.NArg() >= 1 && fs.Arg(0) == "top" {
		return top(fs.Args()[1:], *sock, out)
	}
	if fs.NArg() != 1 {
		fs.Usage()
		return fmt.Errorf("need exactly one command")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	switch cmd := fs.Arg(0); cmd {
	case "vms":
		var vms []status.VM
		if err := ipc.Call(ctx, *sock, "vms", nil, &vms); err != nil {
			return err
		}
		if *asJSON {
			return printJSON(out, vms)
		}
		return status.WriteTable(out, vms)
	case "drm":
		var snap mapper.Snapshot
		if err := ipc.Call(ctx, *sock, "drm", nil, &snap); err != nil {
			return err
		}
		if *vmName != "" {
			if snap = snap.Filter(*vmName); len(snap.VMs) == 0 {
				return fmt.Errorf("no VM %q in the DRM", *vmName)
			}
		}
		if *asJSON {
			return printJSON(out, snap)
		}
		fmt.Fprintf(out, "generation %d\n", snap.Generation)
		tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
		for _, r := range snap.Rows() {
			fmt.Fprintf(tw, "%s\t%s\n", r.Key, r.Value)
		}
		return tw.Flush()
	case "status":
		var snap status.Snapshot
		if err := ipc.Call(ctx, *sock, "status", nil, &snap); err != nil {
			return err
		}
		if *asJSON {
			return printJSON(out, snap)
		}
		fmt.Fprintf(out, "tick %d at %s, telemetry: %s, DRM generation %d\n",
			snap.Tick, snap.Time.Format(time.RFC3339), snap.Telemetry, snap.Generation)
		for k, v := range snap.Actions {
			fmt.Fprintf(out, "actions %s: %d\n", k, v)
		}
		for _, e := range snap.Errors {
			fmt.Fprintf(out, "error: %s\n", e)
		}
		return status.WriteTable(out, snap.VMs)
	default:
		fs.Usage()
		return fmt.Errorf("unknown command %q", cmd)
	}
}

func printJSON(out io.Writer, v any) error {
	enc := json.NewEncoder(out)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
