package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/ars-dev/ars/agent/status"
)

func TestRenderTop(t *testing.T) {
	var b bytes.Buffer
	err := renderTop(&b, status.Snapshot{Tick: 42, Time: time.Unix(0, 0), Telemetry: "sched: on [split: collector process]",
		VMs: []status.VM{
			{Name: "web", Class: "critical", UsageMillicores: 1500, DemandMillicores: 1800, ForecastMillicores: 1700,
				AllocMillicores: 2000, RunqValid: true, RunqMeanNs: 120e3, RunqP99Ns: 2.5e6, BorrowedMillicores: 500},
			{Name: "batch", Class: "best-effort", AllocMillicores: 200, LentMillicores: 500},
		},
		Loans:  []status.Loan{{Lender: "batch", Borrower: "web", Resource: "cpu", Amount: 500, Since: time.Unix(0, 0)}},
		Errors: []string{"collector down (restarting)"},
	})
	if err != nil {
		t.Fatal(err)
	}
	out := b.String()
	t.Logf("\n%s", out)
	for _, want := range []string{"tick 42", "[split: collector process]", "RUNQ-P99", "2.50ms", "0.12ms",
		"loan: batch lends 500 cpu to web", "error: collector down"} {
		if !strings.Contains(out, want) {
			t.Errorf("missing %q", want)
		}
	}
	// Rows sorted by name; a VM without telemetry shows "-".
	if strings.Index(out, "batch") > strings.Index(out, " web ") || !strings.Contains(out, "-") {
		t.Errorf("row order or missing placeholder:\n%s", out)
	}
}
