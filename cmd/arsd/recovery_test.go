package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ars-dev/ars/agent/cgroups"
	"github.com/ars-dev/ars/agent/executor"
	"github.com/ars-dev/ars/mapper"
)

// The crash points of one plan's write, in order.
// before-outcome comes after the audit line of the write is appended.
var crashSteps = []string{"before-intent", "after-intent", "after-write", "before-outcome", "after-outcome", "after-sync"}

// fileHost is a one-VM host whose CFS quota is a file; every write is
// also appended (fsynced) to writes.log, which survives the crash.
type fileHost struct {
	dir   string
	crash func(step string)
}

func (h fileHost) ReadQuota(cgroups.Group) (int64, uint64, error) {
	b, err := os.ReadFile(filepath.Join(h.dir, "quota"))
	if err != nil {
		return 0, 0, err
	}
	q, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	return q, 100000, err
}

func (h fileHost) WriteQuota(_ cgroups.Group, q int64) error {
	if err := os.WriteFile(filepath.Join(h.dir, "quota"), []byte(strconv.FormatInt(q, 10)), 0o600); err != nil {
		return err
	}
	f, err := os.OpenFile(filepath.Join(h.dir, "writes.log"), os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	fmt.Fprintln(f, q)
	f.Sync()
	f.Close()
	h.crash("after-write")
	return nil
}

// crashJournal calls crash around the real journal's transactions.
type crashJournal struct {
	j     *mapper.Journal
	crash func(step string)
}

func (c crashJournal) Intents(es []mapper.Entry) ([]uint64, error) {
	c.crash("before-intent")
	s, err := c.j.Intents(es)
	c.crash("after-intent")
	return s, err
}

func (c crashJournal) Outcomes(cs []mapper.Completion) error {
	c.crash("before-outcome")
	err := c.j.Outcomes(cs)
	c.crash("after-outcome")
	return err
}

func plan() []executor.Action {
	return []executor.Action{{VM: "vm", Kind: executor.KindCPUQuota, Group: cgroups.Group{CPU: "/vm"}, Millicores: 700, Epoch: 1, Reason: "test"}}
}

// agentLife is one life of the agent on dir: recover, then apply the
// plan (which the loop would decide again from the host's state).
func agentLife(dir string, crash func(string)) (recovered int, res []executor.Result, err error) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	audit, err := executor.OpenAudit(filepath.Join(dir, "audit.log"))
	if err != nil {
		return 0, nil, err
	}
	defer audit.Close()
	if audit.Rotated != "" {
		return 0, nil, fmt.Errorf("audit chain broken by the crash, rotated to %s", audit.Rotated)
	}
	j, _, err := openJournal(filepath.Join(dir, "drm.db"), log, time.Now)
	if err != nil {
		return 0, nil, err
	}
	defer j.Close()
	if recovered, err = recoverJournal(j, log, time.Now, audit.Append); err != nil {
		return 0, nil, err
	}
	ex := executor.New(executor.Actuators{CPU: fileHost{dir: dir, crash: crash}}, audit, false, time.Now, "test").
		WithJournal(crashJournal{j: j, crash: crash})
	ex.SetEpoch(1)
	res = ex.Apply(context.Background(), plan())
	crash("after-sync")
	return recovered, res, nil
}

// TestCrashAtEveryJournalStep: an agent killed (SIGKILL, a real process)
// at each step of a plan's journal, write, audit and outcome; the next
// life recovers the journal, re-decides from the host and ends with the
// action made exactly once: never lost, never doubled, the audit chain
// intact and no intent left pending.
func TestCrashAtEveryJournalStep(t *testing.T) {
	if step := os.Getenv("ARS_CRASH_STEP"); step != "" {
		dir := os.Getenv("ARS_CRASH_DIR")
		crash := func(s string) {
			if s == step {
				syscall.Kill(os.Getpid(), syscall.SIGKILL)
				select {}
			}
		}
		if _, _, err := agentLife(dir, crash); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(3)
		}
		os.Exit(0)
	}
	for _, step := range crashSteps {
		t.Run(step, func(t *testing.T) {
			dir := t.TempDir()
			os.WriteFile(filepath.Join(dir, "quota"), []byte("-1"), 0o600)
			cmd := exec.Command(os.Args[0], "-test.run=^TestCrashAtEveryJournalStep$")
			cmd.Env = append(os.Environ(), "ARS_CRASH_STEP="+step, "ARS_CRASH_DIR="+dir)
			out, err := cmd.CombinedOutput()
			if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
				t.Fatalf("child did not crash at %s: %v\n%s", step, err, out)
			}
			recovered, res, err := agentLife(dir, func(string) {})
			if err != nil {
				t.Fatal(err)
			}
			b, _ := os.ReadFile(filepath.Join(dir, "writes.log"))
			writes := strings.Fields(string(b))
			q, _, _ := fileHost{dir: dir}.ReadQuota(cgroups.Group{})
			t.Logf("crash %s: %d intent(s) recovered, next life %s, writes %v, quota %d", step, recovered, res[0].Outcome, writes, q)
			if q != 70000 {
				t.Fatalf("action lost: quota %d", q)
			}
			if len(writes) != 1 {
				t.Fatalf("action made %d times: %v", len(writes), writes)
			}
			wantRecovered := map[string]int{"after-intent": 1, "after-write": 1, "before-outcome": 1}[step]
			if recovered != wantRecovered {
				t.Fatalf("recovered %d pending intents, want %d", recovered, wantRecovered)
			}
			j, err := mapper.OpenJournal(filepath.Join(dir, "drm.db"))
			if err != nil {
				t.Fatal(err)
			}
			defer j.Close()
			if p, err := j.Pending(); err != nil || len(p) != 0 {
				t.Fatalf("pending after recovery: %+v %v", p, err)
			}
			if _, err := executor.VerifyFile(filepath.Join(dir, "audit.log")); err != nil {
				t.Fatalf("audit chain: %v", err)
			}
			// The audit says what happened: the write (applied), or the
			// intent in flight at the crash (reconciled) and the host
			// found already written (no second record) or written now.
			var applied, reconciled int
			for _, line := range strings.Split(strings.TrimSpace(readFile(t, filepath.Join(dir, "audit.log"))), "\n") {
				applied += strings.Count(line, `"result":"applied"`)
				reconciled += strings.Count(line, `"result":"reconciled"`)
			}
			// A crash right after the write loses its audit line (never
			// appended); the reconciled record names the value in flight.
			wantApplied := 1
			if step == "after-write" {
				wantApplied = 0
			}
			if applied != wantApplied || reconciled != wantRecovered {
				t.Fatalf("audit has %d applied and %d reconciled records, want %d and %d:\n%s", applied, reconciled, wantApplied, wantRecovered, readFile(t, filepath.Join(dir, "audit.log")))
			}
		})
	}
}

func readFile(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
