package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/ars-dev/ars/predictor"
)

// backtest replays a recorded or public trace through every model and
// writes the chosen model's allocations:
//
//	arsctl backtest --trace PATH --resource cpu|mem|disk|net \
//	    --target-violation 0.02 --out FILE [--model NAME] [--models a,b,...] [--horizon N]
func backtest(args []string, out io.Writer) error {
	fs := flag.NewFlagSet("arsctl backtest", flag.ContinueOnError)
	fs.SetOutput(out)
	trace := fs.String("trace", "", "Bitbrains directory/file or long vm_id,timestamp_s,cpu_pct CSV (plain or .gz)")
	resource := fs.String("resource", "cpu", "cpu, mem, disk or net")
	target := fs.Float64("target-violation", 0.02, "target share of steps with usage > allocation")
	outFile := fs.String("out", "", "write vm_id,timestamp_s,usage,allocation of --model here")
	model := fs.String("model", "ars", "model whose allocations go to --out (one of "+strings.Join(predictor.ModelNames(), ", ")+")")
	models := fs.String("models", "", "comma-separated models to compare (default: all); --model and the baselines are always included")
	step := fs.Duration("step", 0, "sampling step (default: the trace's median interval)")
	horizon := fs.Int("horizon", 0, "also score ars's forecasts 1..N steps ahead (0: skip)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("backtest: unexpected argument %q", fs.Arg(0))
	}
	if *trace == "" {
		return errors.New("backtest: --trace is required")
	}
	if !(*target > 0 && *target < 0.5) {
		return fmt.Errorf("backtest: --target-violation must be in (0, 0.5), got %v", *target)
	}
	res, err := predictor.ParseResource(*resource)
	if err != nil {
		return fmt.Errorf("backtest: %w", err)
	}
	names := predictor.ModelNames()
	if *models != "" {
		names = append([]string{*model}, predictor.BaselineNames()...)
		for _, n := range strings.Split(*models, ",") {
			if n = strings.TrimSpace(n); n != "" {
				names = append(names, n)
			}
		}
		names = dedupe(names)
	}
	found := false
	for _, n := range names {
		found = found || n == *model
	}
	if !found {
		names = append([]string{*model}, names...)
	}
	t0 := time.Now()
	series, rep, err := predictor.LoadTrace(*trace, res)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "trace %s (%s): %d series; %s\n", *trace, res, len(series), rep)
	if len(rep.Short) > 0 {
		fmt.Fprintf(out, "short series skipped: %s\n", strings.Join(rep.Short, " "))
	}
	if len(series) == 0 {
		return errors.New("backtest: no series with at least 2 usable rows")
	}
	st := *step
	if st == 0 {
		st = time.Duration(rep.StepSeconds) * time.Second
		if st <= 0 {
			st = time.Second
		}
	}
	loaded := time.Since(t0)
	r, err := predictor.Backtest(series, predictor.BacktestConfig{Models: names, Alpha: *target, Step: st})
	if err != nil {
		return err
	}
	steps := 0
	if len(r.Models) > 0 {
		steps = r.Models[0].Steps
	}
	fmt.Fprintf(out, "step %v, %d steps per model, %d models; load %v, replay %v\n\n", st, steps, len(names), loaded.Round(time.Millisecond), r.Elapsed.Round(time.Millisecond))
	r.WriteSummary(out, *target, r.Index(*model))
	if *horizon > 0 {
		hs, err := predictor.BacktestHorizon(series, *target, *horizon)
		if err != nil {
			return fmt.Errorf("backtest: %w", err)
		}
		fmt.Fprintf(out, "\nars %d steps ahead (allocation decided h steps before the sample):\n%-4s %8s %10s %10s\n", *horizon, "h", "steps", "violation", "slack")
		for _, h := range hs {
			fmt.Fprintf(out, "%-4d %8d %9.3f%% %10.4f\n", h.H, h.Steps, 100*h.ViolationRate(), h.Slack)
		}
	}
	if *outFile != "" {
		f, err := os.Create(*outFile)
		if err != nil {
			return err
		}
		if err := r.WriteAllocations(f, r.Index(*model)); err != nil {
			f.Close()
			return err
		}
		if err := f.Close(); err != nil {
			return err
		}
		fmt.Fprintf(out, "\nwrote %s allocations to %s\n", *model, *outFile)
	}
	return nil
}

func dedupe(in []string) []string {
	seen := map[string]bool{}
	var out []string
	for _, s := range in {
		if !seen[s] {
			seen[s] = true
			out = append(out, s)
		}
	}
	return out
}
