package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"path/filepath"

	"github.com/ars-dev/ars/agent/config"
	"github.com/ars-dev/ars/agent/executor"
)

// auditCmd implements `arsctl audit verify [--log FILE]`: exit 0 on an
// intact hash chain, non-zero naming the first bad line otherwise.
func auditCmd(args []string, out io.Writer) error {
	if len(args) == 0 || args[0] != "verify" {
		return errors.New("usage: arsctl audit verify [--log FILE]")
	}
	fs := flag.NewFlagSet("audit verify", flag.ContinueOnError)
	log := fs.String("log", filepath.Join(config.Default().StateDir, "audit.log"), "audit log to verify")
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	head, err := executor.VerifyFile(*log)
	if err != nil {
		return fmt.Errorf("%s: %w", *log, err)
	}
	fmt.Fprintf(out, "%s: intact, %d records, head %s\n", *log, head.Seq, head.Hash)
	return nil
}
