package vm

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"
)

// defaultTimeout bounds control exchanges whose context has no deadline.
const defaultTimeout = 30 * time.Second

// CommandError is a well-formed "err ..." reply from the guest.
type CommandError struct {
	Command, Reply string
}

func (e *CommandError) Error() string {
	return fmt.Sprintf("guest refused %q: %s", e.Command, e.Reply)
}

// Command sends one line to the guest workload over virtio-serial and
// returns its one-line reply ("ok ..."). An "err ..." reply is returned
// too, with a *CommandError. Requests carry a tag so a late reply to an
// abandoned request is never taken for the answer to a new one.
func (v *VM) Command(ctx context.Context, line string) (string, error) {
	if strings.ContainsAny(line, "\r\n") {
		return "", fmt.Errorf("vm %s: command %q spans lines", v.Name, line)
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, defaultTimeout)
		defer cancel()
	}
	v.ctlMu.Lock()
	defer v.ctlMu.Unlock()
	if v.ctl == nil {
		var d net.Dialer
		c, err := d.DialContext(ctx, "unix", v.CtlPath)
		if err != nil {
			return "", fmt.Errorf("vm %s: control socket: %w", v.Name, err)
		}
		v.ctl, v.ctlR = c, bufio.NewReader(c)
	}
	conn, r := v.ctl, v.ctlR
	fail := func(err error) (string, error) {
		// A broken or timed-out exchange leaves the stream in an unknown
		// state: start afresh next time.
		conn.Close()
		v.ctl, v.ctlR = nil, nil
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		return "", fmt.Errorf("vm %s: command %q: %w", v.Name, line, err)
	}
	dl, _ := ctx.Deadline()
	conn.SetDeadline(dl)
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	v.ctlSeq++
	tag := "@h" + strconv.FormatUint(v.ctlSeq, 10)
	if _, err := fmt.Fprintf(conn, "%s %s\n", tag, line); err != nil {
		return fail(err)
	}
	for {
		s, err := r.ReadString('\n')
		if err != nil {
			return fail(err)
		}
		s = strings.TrimRight(s, "\r\n")
		reply, ok := strings.CutPrefix(s, tag+" ")
		if !ok {
			continue // a stale reply, or noise
		}
		if strings.HasPrefix(reply, "ok") {
			return reply, nil
		}
		return reply, &CommandError{Command: line, Reply: reply}
	}
}

// Load is a workload set-point.
type Load struct {
	CPUPercent int // percent of one CPU (150 = 1.5 CPUs)
	MemMiB     int
	IOKiBps    int // O_DIRECT writes to /dev/vda; needs Config.Disk
	NetKbps    int // UDP to the tap's host end; needs Config.Net
}

// SetLoad replaces the whole set-point at once (and stops a schedule).
func (v *VM) SetLoad(ctx context.Context, l Load) error {
	_, err := v.Command(ctx, fmt.Sprintf("set cpu=%d,mem=%d,io=%d,net=%d", l.CPUPercent, l.MemMiB, l.IOKiBps, l.NetKbps))
	return err
}

// Status is what the guest workload reports.
type Status struct {
	Load
	CPUs int // online CPUs in the guest
	// MemAvailMiB is the guest kernel's MemAvailable (−1 when the guest
	// could not read it or is too old to report it).
	MemAvailMiB int
}

// Status asks the guest for its set-point and online CPU count.
func (v *VM) Status(ctx context.Context) (Status, error) {
	reply, err := v.Command(ctx, "status")
	if err != nil {
		return Status{}, err
	}
	return ParseStatus(reply)
}

// ParseStatus parses "ok cpu=.. mem=.. io=.. net=.. cpus=N".
func ParseStatus(reply string) (Status, error) {
	rest, ok := strings.CutPrefix(reply, "ok ")
	if !ok {
		return Status{}, fmt.Errorf("vm: status reply %q", reply)
	}
	s := Status{MemAvailMiB: -1}
	seen := map[string]bool{}
	for _, kv := range strings.Fields(rest) {
		k, val, ok := strings.Cut(kv, "=")
		if !ok {
			continue
		}
		n, err := strconv.Atoi(val)
		if err != nil {
			return Status{}, fmt.Errorf("vm: status reply %q: %s: %w", reply, k, err)
		}
		switch k {
		case "cpu":
			s.CPUPercent = n
		case "mem":
			s.MemMiB = n
		case "io":
			s.IOKiBps = n
		case "net":
			s.NetKbps = n
		case "cpus":
			s.CPUs = n
		case "memavail":
			s.MemAvailMiB = n
		default:
			continue
		}
		seen[k] = true
	}
	for _, k := range []string{"cpu", "mem", "io", "net", "cpus"} {
		if !seen[k] {
			return Status{}, fmt.Errorf("vm: status reply %q lacks %s", reply, k)
		}
	}
	return s, nil
}

// QMPError is an error reply from QEMU.
type QMPError struct {
	Command, Class, Desc string
}

func (e *QMPError) Error() string {
	return fmt.Sprintf("qmp %s: %s: %s", e.Command, e.Class, e.Desc)
}

// QMP runs one QMP command on a fresh connection and returns its "return"
// value; events seen meanwhile are skipped. QEMU serves one QMP client at a
// time, so this blocks (until ctx ends) while another client, such as an
// agent under test, holds the socket.
func (v *VM) QMP(ctx context.Context, command string, args any) (json.RawMessage, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, defaultTimeout)
		defer cancel()
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", v.QMPPath)
	if err != nil {
		return nil, fmt.Errorf("vm %s: qmp: %w", v.Name, err)
	}
	defer conn.Close()
	dl, _ := ctx.Deadline()
	conn.SetDeadline(dl)
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	dec := json.NewDecoder(conn)
	var greeting map[string]json.RawMessage
	if err := dec.Decode(&greeting); err != nil {
		return nil, fmt.Errorf("vm %s: qmp greeting: %w", v.Name, err)
	}
	if _, ok := greeting["QMP"]; !ok {
		return nil, fmt.Errorf("vm %s: qmp: unexpected greeting", v.Name)
	}
	exchange := func(cmd string, args any) (json.RawMessage, error) {
		req := map[string]any{"execute": cmd}
		if args != nil {
			req["arguments"] = args
		}
		b, err := json.Marshal(req)
		if err != nil {
			return nil, fmt.Errorf("vm %s: qmp %s: %w", v.Name, cmd, err)
		}
		if _, err := conn.Write(append(b, '\n')); err != nil {
			return nil, fmt.Errorf("vm %s: qmp %s: %w", v.Name, cmd, err)
		}
		for {
			var resp struct {
				Return json.RawMessage `json:"return"`
				Error  *struct {
					Class string `json:"class"`
					Desc  string `json:"desc"`
				} `json:"error"`
				Event string `json:"event"`
			}
			if err := dec.Decode(&resp); err != nil {
				if ctx.Err() != nil {
					err = ctx.Err()
				}
				return nil, fmt.Errorf("vm %s: qmp %s: %w", v.Name, cmd, err)
			}
			switch {
			case resp.Event != "":
				continue
			case resp.Error != nil:
				return nil, &QMPError{Command: cmd, Class: resp.Error.Class, Desc: resp.Error.Desc}
			case resp.Return != nil:
				return resp.Return, nil
			}
		}
	}
	if _, err := exchange("qmp_capabilities", nil); err != nil {
		return nil, err
	}
	return exchange(command, args)
}

// GuestDir locates the built guest (vmlinuz, initramfs.gz): $ARS_GUEST_DIR
// if set, else build/guest in the repository found upwards from the working
// directory, else build/guest beside this source file's repository.
func GuestDir() (string, error) {
	if d := os.Getenv("ARS_GUEST_DIR"); d != "" {
		return d, nil
	}
	var tried []string
	if wd, err := os.Getwd(); err == nil {
		for d := wd; ; d = filepath.Dir(d) {
			if isRepoRoot(d) {
				return filepath.Join(d, "build", "guest"), nil
			}
			if filepath.Dir(d) == d {
				break
			}
		}
		tried = append(tried, "above "+wd)
	}
	if _, file, _, ok := runtime.Caller(0); ok {
		root := filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
		if isRepoRoot(root) {
			return filepath.Join(root, "build", "guest"), nil
		}
		tried = append(tried, root)
	}
	return "", errors.New("vm: cannot find the ARS repository (tried " + strings.Join(tried, ", ") +
		"); set ARS_GUEST_DIR or Config.Kernel/Initrd")
}

func isRepoRoot(dir string) bool {
	b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
	if err != nil {
		return false
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.TrimSpace(l) == "module github.com/ars-dev/ars" {
			return true
		}
	}
	return false
}
