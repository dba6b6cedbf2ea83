package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/ars-dev/ars/ipc"
	"github.com/ars-dev/ars/synthesizer"
)

const slaUsage = `usage: arsctl sla get VM [--json]
       arsctl sla set VM --file sla.yaml|-        the SLA in the config's YAML form
       arsctl sla set VM [--cpu-floor M] [--cpu-ceiling M]   change the CPU bounds (millicores) of the SLA in force`

// slaView mirrors arsd's sla.get / sla.set result.
type slaView struct {
	VM     string `json:"vm"`
	Source string `json:"source"`
	SLA    string `json:"sla"`
	Before string `json:"before,omitempty"`
}

// maxSLAFile bounds the file given to `sla set --file`.
const maxSLAFile = 16 << 10

// slaCmd implements `arsctl sla get|set`.
func slaCmd(args []string, sock string, asJSON bool, in io.Reader, out io.Writer) error {
	if len(args) == 0 || (args[0] != "get" && args[0] != "set") {
		return errors.New(slaUsage)
	}
	verb := args[0]
	fs := flag.NewFlagSet("sla "+verb, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	jsonOut := fs.Bool("json", asJSON, "print raw JSON")
	file := fs.String("file", "", "set: SLA file (YAML, '-' for stdin)")
	floor := fs.Int64("cpu-floor", -1, "set: CPU floor in millicores")
	ceiling := fs.Int64("cpu-ceiling", -1, "set: CPU ceiling in millicores")
	// Flags may come before or after the VM name.
	var pos []string
	rest := args[1:]
	for {
		if err := fs.Parse(rest); err != nil {
			return fmt.Errorf("sla %s: %w\n%s", verb, err, slaUsage)
		}
		if fs.NArg() == 0 {
			break
		}
		pos = append(pos, fs.Arg(0))
		rest = fs.Args()[1:]
	}
	if len(pos) != 1 {
		return fmt.Errorf("sla %s: need exactly one VM name, got %d\n%s", verb, len(pos), slaUsage)
	}
	vm := pos[0]
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var v slaView
	switch verb {
	case "get":
		if *file != "" || *floor >= 0 || *ceiling >= 0 {
			return fmt.Errorf("sla get: --file, --cpu-floor and --cpu-ceiling are for sla set\n%s", slaUsage)
		}
		if err := ipc.Call(ctx, sock, "sla.get", map[string]string{"vm": vm}, &v); err != nil {
			return err
		}
		if *jsonOut {
			return printJSON(out, v)
		}
		fmt.Fprintf(out, "# vm %s, SLA from %s\n%s", v.VM, v.Source, v.SLA)
		return nil
	}
	text, err := slaText(ctx, sock, vm, *file, *floor, *ceiling, in)
	if err != nil {
		return err
	}
	if err := ipc.Call(ctx, sock, "sla.set", map[string]string{"vm": vm, "sla": text}, &v); err != nil {
		return err
	}
	if *jsonOut {
		return printJSON(out, v)
	}
	fmt.Fprintf(out, "# vm %s: SLA set\n# before:\n%s# now:\n%s", v.VM, indent(v.Before), v.SLA)
	return nil
}

// slaText is the SLA to send: the file's content, or the SLA in force with
// the CPU bounds changed.
func slaText(ctx context.Context, sock, vm, file string, floor, ceiling int64, in io.Reader) (string, error) {
	bounds := floor >= 0 || ceiling >= 0
	switch {
	case file != "" && bounds:
		return "", errors.New("sla set: give either --file or --cpu-floor/--cpu-ceiling, not both")
	case file == "" && !bounds:
		return "", fmt.Errorf("sla set: nothing to set\n%s", slaUsage)
	case file != "":
		r := in
		if file != "-" {
			f, err := os.Open(file)
			if err != nil {
				return "", fmt.Errorf("sla set: %w", err)
			}
			defer f.Close()
			r = f
		}
		b, err := io.ReadAll(io.LimitReader(r, maxSLAFile+1))
		if err != nil {
			return "", fmt.Errorf("sla set: read %s: %w", file, err)
		}
		if len(b) > maxSLAFile {
			return "", fmt.Errorf("sla set: %s is larger than %d bytes", file, maxSLAFile)
		}
		return string(b), nil
	}
	var cur slaView
	if err := ipc.Call(ctx, sock, "sla.get", map[string]string{"vm": vm}, &cur); err != nil {
		return "", err
	}
	var sla synthesizer.SLA
	if err := yaml.Unmarshal([]byte(cur.SLA), &sla); err != nil {
		return "", fmt.Errorf("sla set: decode the SLA in force: %w", err)
	}
	if floor >= 0 {
		sla.CPU.FloorMillicores = floor
	}
	if ceiling >= 0 {
		sla.CPU.CeilingMillicores = ceiling
	}
	b, err := yaml.Marshal(sla)
	if err != nil {
		return "", fmt.Errorf("sla set: encode: %w", err)
	}
	return string(b), nil
}

func indent(s string) string {
	if s == "" {
		return ""
	}
	return "  " + strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n  ") + "\n"
}
