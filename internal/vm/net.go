package vm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"time"
)

// setupNet creates the VM's network namespace and, inside it, a tap with
// the host address. The names are recorded before each step so that Close
// removes whatever exists after a failure.
func (v *VM) setupNet(ctx context.Context, suffix string) error {
	ns := "ars-" + v.Name + "-" + suffix
	if err := v.runIP(ctx, "netns", "add", ns); err != nil {
		return err
	}
	v.NetNS = ns
	tap := tapName(v.Name, suffix)
	v.Tap = tap
	for _, args := range [][]string{
		{"-n", ns, "link", "set", "lo", "up"},
		{"-n", ns, "tuntap", "add", "dev", tap, "mode", "tap"},
		{"-n", ns, "addr", "add", fmt.Sprintf("%s/%d", HostAddr, PrefixLen), "dev", tap},
		{"-n", ns, "link", "set", tap, "up"},
	} {
		if err := v.runIP(ctx, args...); err != nil {
			return err
		}
	}
	return nil
}

// tapName is "ars-" plus up to 5 name characters and the random suffix:
// at most 15 bytes (IFNAMSIZ-1).
func tapName(name, suffix string) string {
	var b strings.Builder
	for i := 0; i < len(name) && b.Len() < 5; i++ {
		c := name[i]
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' {
			b.WriteByte(c)
		}
	}
	s := "ars-" + b.String() + suffix
	if len(s) > 15 {
		s = s[:15]
	}
	return s
}

func (v *VM) teardownNet() error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var errs []error
	if v.Tap != "" {
		// Deleting the netns would take the tap with it; deleting it first
		// keeps that true even if something still holds the netns open.
		if err := v.runIP(ctx, "-n", v.NetNS, "link", "del", v.Tap); err != nil && !notFound(err) {
			errs = append(errs, err)
		}
	}
	if err := v.runIP(ctx, "netns", "del", v.NetNS); err != nil && !notFound(err) {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func notFound(err error) bool {
	s := err.Error()
	return strings.Contains(s, "No such file") || strings.Contains(s, "Cannot find device") ||
		strings.Contains(s, "does not exist") || strings.Contains(s, "No such device")
}

func (v *VM) runIP(ctx context.Context, args ...string) error {
	ip := v.ip
	if ip == "" {
		ip = "ip"
	}
	out, err := exec.CommandContext(ctx, ip, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("vm %s: ip %s: %w: %s", v.Name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// TapCounters are the host-side counters of the VM's tap. Frames the guest
// sends are received (rx) by the tap.
type TapCounters struct {
	RxBytes, RxPackets, TxBytes, TxPackets uint64
}

// TapStats reads the tap's counters inside the VM's netns.
func (v *VM) TapStats(ctx context.Context) (TapCounters, error) {
	if v.NetNS == "" {
		return TapCounters{}, fmt.Errorf("vm %s: no network (Config.Net is off)", v.Name)
	}
	out, err := exec.CommandContext(ctx, "ip", "-n", v.NetNS, "-j", "-s", "link", "show", "dev", v.Tap).Output()
	if err != nil {
		return TapCounters{}, fmt.Errorf("vm %s: tap stats: %w", v.Name, err)
	}
	return parseTapStats(out)
}

func parseTapStats(out []byte) (TapCounters, error) {
	var links []struct {
		Stats64 struct {
			Rx struct{ Bytes, Packets uint64 } `json:"rx"`
			Tx struct{ Bytes, Packets uint64 } `json:"tx"`
		} `json:"stats64"`
	}
	if err := json.Unmarshal(out, &links); err != nil {
		return TapCounters{}, fmt.Errorf("vm: parse ip -j -s link: %w", err)
	}
	if len(links) != 1 {
		return TapCounters{}, fmt.Errorf("vm: ip -j -s link listed %d links, want 1", len(links))
	}
	s := links[0].Stats64
	return TapCounters{RxBytes: s.Rx.Bytes, RxPackets: s.Rx.Packets, TxBytes: s.Tx.Bytes, TxPackets: s.Tx.Packets}, nil
}
