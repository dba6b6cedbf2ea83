package main

import (
	"context"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestParseCommand(t *testing.T) {
	sp := func(has Field, l Load) SetPoint { return SetPoint{Has: has, Load: l} }
	tests := []struct {
		line    string
		want    Command
		wantErr string // substring; "" means success
	}{
		{line: "cpu 150", want: Command{Kind: KindSet, Set: sp(FieldCPU, Load{CPU: 150})}},
		{line: "  CPU   0 ", want: Command{Kind: KindSet, Set: sp(FieldCPU, Load{})}},
		{line: "mem 64", want: Command{Kind: KindSet, Set: sp(FieldMem, Load{Mem: 64})}},
		{line: "io 512", want: Command{Kind: KindSet, Set: sp(FieldIO, Load{IO: 512})}},
		{line: "net 500", want: Command{Kind: KindSet, Set: sp(FieldNet, Load{Net: 500})}},
		{line: "set cpu=50,mem=16", want: Command{Kind: KindSet, Set: sp(FieldCPU|FieldMem, Load{CPU: 50, Mem: 16})}},
		{line: "set cpu=50 net=8", want: Command{Kind: KindSet, Set: sp(FieldCPU|FieldNet, Load{CPU: 50, Net: 8})}},
		{line: "status", want: Command{Kind: KindStatus}},
		{line: "help", want: Command{Kind: KindHelp}},
		{line: "schedule 5s:cpu=50,mem=10 10s:cpu=0", want: Command{Kind: KindSchedule, Steps: []Step{
			{Dur: 5 * time.Second, Set: sp(FieldCPU|FieldMem, Load{CPU: 50, Mem: 10})},
			{Dur: 10 * time.Second, Set: sp(FieldCPU, Load{})},
		}}},
		{line: "schedule 500ms:io=4;3:net=1", want: Command{Kind: KindSchedule, Steps: []Step{
			{Dur: 500 * time.Millisecond, Set: sp(FieldIO, Load{IO: 4})},
			{Dur: 3 * time.Second, Set: sp(FieldNet, Load{Net: 1})},
		}}},

		{line: "", wantErr: "empty command"},
		{line: "   \t", wantErr: "empty command"},
		{line: "cpu", wantErr: "usage: cpu N"},
		{line: "cpu 1 2", wantErr: "usage: cpu N"},
		{line: "cpu -1", wantErr: "not a non-negative integer"},
		{line: "cpu +1", wantErr: "not a non-negative integer"},
		{line: "cpu 1.5", wantErr: "not a non-negative integer"},
		{line: "cpu 0x10", wantErr: "not a non-negative integer"},
		{line: "cpu 6401", wantErr: "above limit"},
		{line: "cpu 99999999999999999999", wantErr: "too large"},
		{line: "mem abc", wantErr: "not a non-negative integer"},
		{line: "set", wantErr: "usage: set"},
		{line: "set cpu", wantErr: "want key=value"},
		{line: "set cpu=", wantErr: "missing value"},
		{line: "set disk=5", wantErr: "unknown key"},
		{line: "set cpu=1,cpu=2", wantErr: "given twice"},
		{line: "set ,,,", wantErr: "no key=value"},
		{line: "schedule", wantErr: "usage: schedule"},
		{line: "schedule cpu=5", wantErr: "want DUR:key=v"},
		{line: "schedule 5x:cpu=5", wantErr: "bad duration"},
		{line: "schedule 0s:cpu=5", wantErr: "out of range"},
		{line: "schedule -5s:cpu=5", wantErr: "out of range"},
		{line: "schedule 25h:cpu=5", wantErr: "out of range"},
		{line: "schedule 5s:", wantErr: "no key=value"},
		{line: "schedule 5s:cpu=1 6s:mem=x", wantErr: "step 2"},
		{line: "schedule " + strings.Repeat("1s:cpu=1 ", MaxSteps+1), wantErr: "at most"},
		{line: "status now", wantErr: "takes no arguments"},
		{line: "reboot", wantErr: "unknown command"},
		{line: "cpu " + strings.Repeat("1", MaxLineLen), wantErr: "longer than"},
	}
	for _, tc := range tests {
		t.Run(tc.line, func(t *testing.T) {
			got, err := ParseCommand(tc.line)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("ParseCommand(%q) error = %v, want containing %q", tc.line, err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseCommand(%q): %v", tc.line, err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("ParseCommand(%q) = %+v, want %+v", tc.line, got, tc.want)
			}
		})
	}
}

func TestSplitTag(t *testing.T) {
	tests := []struct {
		line, tag, rest string
		bad             bool
	}{
		{line: "status", rest: "status"},
		{line: "@7 status", tag: "7", rest: " status"},
		{line: "  @a.b-c_d cpu 5", tag: "a.b-c_d", rest: " cpu 5"},
		{line: "@x", tag: "x", rest: ""},
		{line: "@ status", bad: true},
		{line: "@a/b status", bad: true},
		{line: "@" + strings.Repeat("x", 33) + " status", bad: true},
	}
	for _, tc := range tests {
		tag, rest, err := SplitTag(tc.line)
		if (err != nil) != tc.bad {
			t.Errorf("SplitTag(%q) err = %v, want bad=%v", tc.line, err, tc.bad)
			continue
		}
		if !tc.bad && (tag != tc.tag || rest != tc.rest) {
			t.Errorf("SplitTag(%q) = %q, %q; want %q, %q", tc.line, tag, rest, tc.tag, tc.rest)
		}
	}
}

// FuzzParseCommand checks that no input crashes the parser, that accepted
// commands respect the limits, and that the canonical form parses back to
// the same command.
func FuzzParseCommand(f *testing.F) {
	for _, s := range []string{
		"cpu 100", "mem 64", "io 512", "net 500", "status", "help",
		"set cpu=1,mem=2,io=3,net=4", "schedule 5s:cpu=50,mem=10 10s:cpu=0",
		"schedule 1:cpu=1;2:io=2", "@1 status", "cpu -1", "schedule 5s:", "",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, line string) {
		_, rest, err := SplitTag(line)
		if err != nil {
			return
		}
		c, err := ParseCommand(rest)
		if err != nil {
			if err.Error() == "" || strings.ContainsAny(err.Error(), "\n\r") {
				t.Fatalf("error for %q is not a one-line reason: %q", rest, err)
			}
			return
		}
		check := func(sp SetPoint) {
			if sp.Has == 0 {
				t.Fatalf("%q: accepted an empty set-point", rest)
			}
			l := sp.Load
			if l.CPU < 0 || l.CPU > MaxCPU || l.Mem < 0 || l.Mem > MaxMemMiB ||
				l.IO < 0 || l.IO > MaxIOKiBps || l.Net < 0 || l.Net > MaxNetKbps {
				t.Fatalf("%q: out-of-range set-point %+v", rest, l)
			}
		}
		switch c.Kind {
		case KindSet:
			check(c.Set)
		case KindSchedule:
			if len(c.Steps) == 0 || len(c.Steps) > MaxSteps {
				t.Fatalf("%q: %d steps", rest, len(c.Steps))
			}
			for _, s := range c.Steps {
				if s.Dur <= 0 || s.Dur > MaxStepDur {
					t.Fatalf("%q: duration %s", rest, s.Dur)
				}
				check(s.Set)
			}
		case KindStatus, KindHelp:
		default:
			t.Fatalf("%q: kind %d", rest, c.Kind)
		}
		again, err := ParseCommand(c.String())
		if err != nil {
			t.Fatalf("canonical form %q of %q does not parse: %v", c.String(), rest, err)
		}
		if !reflect.DeepEqual(again, c) {
			t.Fatalf("round trip of %q via %q: %+v != %+v", rest, c.String(), again, c)
		}
	})
}

// fakeEnv and fakeGen let the engine run without a guest.
type fakeEnv struct {
	cpus          int
	disk, nic     bool
	availMiB      int
	memErr        error
	setCalls      []string
	failGenerator error
}

func (e *fakeEnv) OnlineCPUs() int               { return e.cpus }
func (e *fakeEnv) HasDisk() bool                 { return e.disk }
func (e *fakeEnv) HasNIC() bool                  { return e.nic }
func (e *fakeEnv) MemAvailableMiB() (int, error) { return e.availMiB, e.memErr }

type fakeGen struct {
	name string
	env  *fakeEnv
	v    int
}

func (g *fakeGen) Set(v int) error {
	if g.env.failGenerator != nil {
		return g.env.failGenerator
	}
	g.v = v
	g.env.setCalls = append(g.env.setCalls, g.name)
	return nil
}

func newTestEngine(t *testing.T, env *fakeEnv) (*Engine, map[string]*fakeGen) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	g := map[string]*fakeGen{}
	for _, n := range []string{"cpu", "mem", "io", "net"} {
		g[n] = &fakeGen{name: n, env: env}
	}
	return NewEngine(ctx, env, g["cpu"], g["mem"], g["io"], g["net"], func(string, ...any) {}), g
}

func TestEngineHandle(t *testing.T) {
	env := &fakeEnv{cpus: 2, availMiB: 100}
	e, g := newTestEngine(t, env)
	steps := []struct{ in, want string }{
		{"status", "ok cpu=0 mem=0 io=0 net=0 cpus=2 memavail=100"},
		{"cpu 150", "ok cpu=150"},
		{"@x1 mem 50", "@x1 ok mem=50"},
		{"mem 200", "err mem: 200 MiB exceeds what the guest can give (134 MiB)"},
		{"io 5", "err io: no virtio disk (/dev/vda)"},
		{"net 5", "err net: no virtio-net NIC (eth0)"},
		{"io 0", "ok io=0"},
		{"set cpu=10,mem=20", "ok cpu=10 mem=20 io=0 net=0"},
		{"@t status", "@t ok cpu=10 mem=20 io=0 net=0 cpus=2 memavail=100"},
		{"bogus", "err unknown command \"bogus\" (try help)"},
		{"@bad/tag status", "err bad tag: want @ and 1-32 of [A-Za-z0-9._-]"},
		{"schedule 1s:io=1", "err step 1: io: no virtio disk (/dev/vda)"},
	}
	for _, s := range steps {
		if got := e.Handle(s.in); got != s.want {
			t.Errorf("Handle(%q) = %q, want %q", s.in, got, s.want)
		}
	}
	if g["cpu"].v != 10 || g["mem"].v != 20 {
		t.Errorf("generators cpu=%d mem=%d, want 10 20", g["cpu"].v, g["mem"].v)
	}

	env.failGenerator = errors.New("boom")
	if got := e.Handle("cpu 5"); got != "err cpu: boom" {
		t.Errorf("failing generator: got %q", got)
	}
	if got := e.Current().CPU; got != 10 {
		t.Errorf("after failed set cpu=%d, want unchanged 10", got)
	}
}

func TestEngineSchedule(t *testing.T) {
	env := &fakeEnv{cpus: 1, availMiB: 100, disk: true}
	e, _ := newTestEngine(t, env)
	if got := e.Handle("schedule 50ms:cpu=80,io=4 50ms:cpu=20 50ms:mem=8"); got != "ok schedule steps=3 total=150ms" {
		t.Fatalf("schedule reply %q", got)
	}
	if got := e.Current(); got != (Load{CPU: 80, IO: 4}) {
		t.Fatalf("first step not applied at once: %+v", got)
	}
	want := Load{CPU: 20, Mem: 8, IO: 4}
	deadline := time.Now().Add(5 * time.Second)
	for e.Current() != want && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := e.Current(); got != want {
		t.Fatalf("after schedule %+v, want last step held %+v", got, want)
	}
	time.Sleep(120 * time.Millisecond)
	if got := e.Current(); got != want {
		t.Fatalf("last step not held: %+v", got)
	}

	// A direct set-point cancels a running schedule.
	if got := e.Handle("schedule 30ms:cpu=1 30ms:cpu=2 30ms:cpu=3"); !strings.HasPrefix(got, "ok") {
		t.Fatal(got)
	}
	if got := e.Handle("cpu 55"); got != "ok cpu=55" {
		t.Fatal(got)
	}
	time.Sleep(150 * time.Millisecond)
	if got := e.Current().CPU; got != 55 {
		t.Fatalf("schedule kept running after cpu 55: cpu=%d", got)
	}

	// A schedule whose later step asks too much memory is refused whole.
	if got := e.Handle("schedule 1s:mem=1 1s:mem=500"); !strings.HasPrefix(got, "err step 2: mem:") {
		t.Fatalf("oversized schedule: %q", got)
	}
}

func TestCountCPUList(t *testing.T) {
	for in, want := range map[string]int{"0": 1, "0-1": 2, "0-2,4": 4, "0,2,4-7": 6} {
		if got, err := countCPUList(in); err != nil || got != want {
			t.Errorf("countCPUList(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"x", "3-1", "1-"} {
		if _, err := countCPUList(bad); err == nil {
			t.Errorf("countCPUList(%q) accepted", bad)
		}
	}
}

func TestCmdlineValue(t *testing.T) {
	cl := `console=ttyS0 quiet ars.set=cpu=50,mem=8 ars.schedule="5s:cpu=1 6s:cpu=2" panic=1` + "\n"
	if v, ok := cmdlineValue(cl, "ars.set"); !ok || v != "cpu=50,mem=8" {
		t.Errorf("ars.set = %q, %v", v, ok)
	}
	if v, ok := cmdlineValue(cl, "ars.schedule"); !ok || v != "5s:cpu=1 6s:cpu=2" {
		t.Errorf("ars.schedule = %q, %v", v, ok)
	}
	if _, ok := cmdlineValue(cl, "ars.none"); ok {
		t.Error("found absent key")
	}
}

func TestMkdev(t *testing.T) {
	// Values glibc's makedev gives.
	if got := mkdev(252, 1); got != 0xfc01 {
		t.Errorf("mkdev(252,1) = %#x", got)
	}
	if got := mkdev(259, 300); got != 0x11032c {
		t.Errorf("mkdev(259,300) = %#x", got)
	}
}
