package main

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// The control protocol is line based. A request is one line; the reply is
// one line starting with "ok" or "err". A request may carry a tag
// ("@abc status"); the reply then carries the same tag ("@abc ok ..."), which
// lets a host client drop replies that belong to an earlier, abandoned
// request. Humans can type untagged lines.

// Limits keep set-points within what a test guest can mean. Anything above
// is a typo, not a load.
const (
	MaxLineLen  = 4096
	MaxCPU      = 6400       // percent of one CPU (64 CPUs busy)
	MaxMemMiB   = 1 << 20    // 1 TiB; the engine also checks MemAvailable
	MaxIOKiBps  = 1 << 20    // 1 GiB/s
	MaxNetKbps  = 10_000_000 // 10 Gbit/s
	MaxSteps    = 64
	MaxStepDur  = 24 * time.Hour
	maxTagLen   = 32
	maxValueLen = 9 // digits; keeps Atoi far from overflow
)

// Kind is the verb of a parsed command.
type Kind int

// Command kinds.
const (
	KindSet      Kind = iota + 1 // cpu, mem, io, net and set
	KindSchedule                 // schedule
	KindStatus                   // status
	KindHelp                     // help
)

// Field is a bit per load dimension, saying which ones a SetPoint sets.
type Field uint8

// Fields of a SetPoint.
const (
	FieldCPU Field = 1 << iota
	FieldMem
	FieldIO
	FieldNet
)

// Load is a complete load set-point.
type Load struct {
	CPU int // percent of one CPU, spread over online CPUs
	Mem int // MiB kept allocated and touched
	IO  int // KiB/s written with O_DIRECT to /dev/vda
	Net int // kbit/s of UDP payload sent to the host end of the tap
}

func (l Load) String() string {
	return fmt.Sprintf("cpu=%d mem=%d io=%d net=%d", l.CPU, l.Mem, l.IO, l.Net)
}

// SetPoint is a partial Load: only the fields in Has are set.
type SetPoint struct {
	Has  Field
	Load Load
}

// Over returns base with the fields of s replaced.
func (s SetPoint) Over(base Load) Load {
	if s.Has&FieldCPU != 0 {
		base.CPU = s.Load.CPU
	}
	if s.Has&FieldMem != 0 {
		base.Mem = s.Load.Mem
	}
	if s.Has&FieldIO != 0 {
		base.IO = s.Load.IO
	}
	if s.Has&FieldNet != 0 {
		base.Net = s.Load.Net
	}
	return base
}

// String renders s as "key=v,key=v" in a fixed order.
func (s SetPoint) String() string {
	var parts []string
	if s.Has&FieldCPU != 0 {
		parts = append(parts, "cpu="+strconv.Itoa(s.Load.CPU))
	}
	if s.Has&FieldMem != 0 {
		parts = append(parts, "mem="+strconv.Itoa(s.Load.Mem))
	}
	if s.Has&FieldIO != 0 {
		parts = append(parts, "io="+strconv.Itoa(s.Load.IO))
	}
	if s.Has&FieldNet != 0 {
		parts = append(parts, "net="+strconv.Itoa(s.Load.Net))
	}
	return strings.Join(parts, ",")
}

// Step is one entry of a schedule: hold Set for Dur, then go on.
type Step struct {
	Dur time.Duration
	Set SetPoint
}

// Command is a parsed request line.
type Command struct {
	Kind  Kind
	Set   SetPoint // KindSet
	Steps []Step   // KindSchedule
}

// String renders c in the canonical form ParseCommand accepts.
func (c Command) String() string {
	switch c.Kind {
	case KindSet:
		return "set " + c.Set.String()
	case KindSchedule:
		parts := []string{"schedule"}
		for _, s := range c.Steps {
			parts = append(parts, s.Dur.String()+":"+s.Set.String())
		}
		return strings.Join(parts, " ")
	case KindStatus:
		return "status"
	case KindHelp:
		return "help"
	}
	return "invalid"
}

// SplitTag separates an optional leading "@tag " from a request line. The
// tag is returned without '@'. A malformed tag is an error.
func SplitTag(line string) (tag, rest string, err error) {
	line = strings.TrimLeft(line, " \t")
	if !strings.HasPrefix(line, "@") {
		return "", line, nil
	}
	end := strings.IndexAny(line, " \t")
	if end < 0 {
		end = len(line)
	}
	tag = line[1:end]
	if tag == "" || len(tag) > maxTagLen {
		return "", "", fmt.Errorf("bad tag: want @ and 1-%d of [A-Za-z0-9._-]", maxTagLen)
	}
	for i := 0; i < len(tag); i++ {
		c := tag[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return "", "", fmt.Errorf("bad tag: want @ and 1-%d of [A-Za-z0-9._-]", maxTagLen)
		}
	}
	return tag, line[end:], nil
}

// ParseCommand parses one request line (without tag). It never panics; every
// malformed input yields an error meant to follow "err " in a reply.
func ParseCommand(line string) (Command, error) {
	if len(line) > MaxLineLen {
		return Command{}, fmt.Errorf("line longer than %d bytes", MaxLineLen)
	}
	fields := strings.Fields(line)
	if len(fields) == 0 {
		return Command{}, errors.New("empty command")
	}
	verb, args := strings.ToLower(fields[0]), fields[1:]
	switch verb {
	case "cpu", "mem", "io", "net":
		if len(args) != 1 {
			return Command{}, fmt.Errorf("usage: %s N", verb)
		}
		sp, err := parsePair(verb, args[0], SetPoint{})
		if err != nil {
			return Command{}, err
		}
		return Command{Kind: KindSet, Set: sp}, nil
	case "set":
		if len(args) == 0 {
			return Command{}, errors.New("usage: set key=v[,key=v...] (keys cpu mem io net)")
		}
		sp, err := parseSetPoint(strings.Join(args, ","))
		if err != nil {
			return Command{}, err
		}
		return Command{Kind: KindSet, Set: sp}, nil
	case "schedule":
		return parseSchedule(args)
	case "status", "help":
		if len(args) != 0 {
			return Command{}, fmt.Errorf("%s takes no arguments", verb)
		}
		if verb == "status" {
			return Command{Kind: KindStatus}, nil
		}
		return Command{Kind: KindHelp}, nil
	}
	return Command{}, fmt.Errorf("unknown command %q (try help)", clip(fields[0]))
}

// parseSchedule parses "D:key=v,key=v" steps. Steps are separated by
// whitespace or ';' (the kernel command line form has no spaces).
func parseSchedule(args []string) (Command, error) {
	var raw []string
	for _, a := range args {
		for _, s := range strings.Split(a, ";") {
			if s != "" {
				raw = append(raw, s)
			}
		}
	}
	if len(raw) == 0 {
		return Command{}, errors.New("usage: schedule DUR:key=v[,key=v] ... (e.g. 5s:cpu=50 10s:cpu=0)")
	}
	if len(raw) > MaxSteps {
		return Command{}, fmt.Errorf("schedule has %d steps, at most %d", len(raw), MaxSteps)
	}
	c := Command{Kind: KindSchedule}
	for i, s := range raw {
		d, kv, ok := strings.Cut(s, ":")
		if !ok {
			return Command{}, fmt.Errorf("step %d %q: want DUR:key=v", i+1, clip(s))
		}
		dur, err := parseDuration(d)
		if err != nil {
			return Command{}, fmt.Errorf("step %d: %w", i+1, err)
		}
		sp, err := parseSetPoint(kv)
		if err != nil {
			return Command{}, fmt.Errorf("step %d: %w", i+1, err)
		}
		c.Steps = append(c.Steps, Step{Dur: dur, Set: sp})
	}
	return c, nil
}

// parseDuration accepts Go durations ("5s", "1m30s", "500ms") and bare
// integers meaning seconds.
func parseDuration(s string) (time.Duration, error) {
	var d time.Duration
	if n, err := strconv.Atoi(s); err == nil && len(s) <= maxValueLen {
		d = time.Duration(n) * time.Second
	} else {
		d, err = time.ParseDuration(s)
		if err != nil {
			return 0, fmt.Errorf("bad duration %q (like 5s, 500ms)", clip(s))
		}
	}
	if d <= 0 || d > MaxStepDur {
		return 0, fmt.Errorf("duration %q out of range (0, %s]", clip(s), MaxStepDur)
	}
	return d, nil
}

func parseSetPoint(s string) (SetPoint, error) {
	var sp SetPoint
	n := 0
	for _, kv := range strings.Split(s, ",") {
		if kv == "" {
			continue
		}
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return SetPoint{}, fmt.Errorf("%q: want key=value", clip(kv))
		}
		var err error
		if sp, err = parsePair(strings.ToLower(k), v, sp); err != nil {
			return SetPoint{}, err
		}
		n++
	}
	if n == 0 {
		return SetPoint{}, errors.New("no key=value given (keys cpu mem io net)")
	}
	return sp, nil
}

func parsePair(key, val string, sp SetPoint) (SetPoint, error) {
	var f Field
	var max int
	var dst *int
	switch key {
	case "cpu":
		f, max, dst = FieldCPU, MaxCPU, &sp.Load.CPU
	case "mem":
		f, max, dst = FieldMem, MaxMemMiB, &sp.Load.Mem
	case "io":
		f, max, dst = FieldIO, MaxIOKiBps, &sp.Load.IO
	case "net":
		f, max, dst = FieldNet, MaxNetKbps, &sp.Load.Net
	default:
		return SetPoint{}, fmt.Errorf("unknown key %q (keys cpu mem io net)", clip(key))
	}
	if sp.Has&f != 0 {
		return SetPoint{}, fmt.Errorf("%s given twice", key)
	}
	v, err := parseValue(val)
	if err != nil {
		return SetPoint{}, fmt.Errorf("%s: %w", key, err)
	}
	if v > max {
		return SetPoint{}, fmt.Errorf("%s=%d above limit %d", key, v, max)
	}
	*dst = v
	sp.Has |= f
	return sp, nil
}

// parseValue accepts a plain non-negative decimal integer.
func parseValue(s string) (int, error) {
	if s == "" {
		return 0, errors.New("missing value")
	}
	if len(s) > maxValueLen {
		return 0, fmt.Errorf("value %q too large", clip(s))
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, fmt.Errorf("value %q is not a non-negative integer", clip(s))
		}
	}
	return strconv.Atoi(s)
}

// clip shortens user input quoted in error messages.
func clip(s string) string {
	if len(s) > 40 {
		return s[:40] + "..."
	}
	return s
}
