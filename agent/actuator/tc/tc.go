package tc

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"strings"
)

// Rates is what is currently applied to a link by ARS. Zero means "not
// shaped by ARS" in that direction.
type Rates struct {
	// EgressBitsPerSec limits the tap's egress: host → VM (VM download).
	EgressBitsPerSec uint64
	// IngressBitsPerSec limits the tap's ingress: VM → host (VM upload).
	IngressBitsPerSec uint64
}

// Shaper is the narrow tc actuator the executor calls. Set* and Clear
// report whether they wrote anything to the kernel: setting the rate a link
// already has is a no-op that returns changed == false. Invalid input is
// rejected before any write.
type Shaper interface {
	SetEgress(ctx context.Context, link string, rateBitsPerSec uint64) (changed bool, err error)
	SetIngress(ctx context.Context, link string, rateBitsPerSec uint64) (changed bool, err error)
	Get(ctx context.Context, link string) (Rates, error)
	Clear(ctx context.Context, link string) (changed bool, err error)
}

// Limits on rates, in bits per second. Rates are stored by the kernel in
// whole bytes per second, so a rate is rounded down to a multiple of 8.
const (
	MinRate uint64 = 64_000          // 64 kbit/s
	MaxRate uint64 = 100_000_000_000 // 100 Gbit/s
)

// MinBurst is the floor of Burst, in bytes.
const MinBurst = 32 << 10

// IFBPrefix starts the name of every IFB device ARS creates.
const IFBPrefix = "arsifb"

var (
	// ErrInvalidRate: the rate is outside [MinRate, MaxRate].
	ErrInvalidRate = errors.New("tc: invalid rate")
	// ErrInvalidLink: the link name cannot be a Linux interface name.
	ErrInvalidLink = errors.New("tc: invalid link name")
	// ErrNoLink: the link does not exist (the VM's tap vanished).
	ErrNoLink = errors.New("tc: link not found")
	// ErrForeign: the link carries traffic control ARS did not install;
	// ARS refuses to replace it.
	ErrForeign = errors.New("tc: link has traffic control ARS does not own")
)

// ValidateRate checks a rate in bits per second.
func ValidateRate(rate uint64) error {
	if rate < MinRate || rate > MaxRate {
		return fmt.Errorf("%w: %d bit/s outside [%d, %d]", ErrInvalidRate, rate, MinRate, MaxRate)
	}
	return nil
}

// ValidateLink checks an interface name: 1..15 bytes, no '/', no
// whitespace, not "." or "..", and not one of ARS's own IFB devices.
func ValidateLink(name string) error {
	switch {
	case name == "" || len(name) > 15:
		return fmt.Errorf("%w: %q must be 1..15 bytes", ErrInvalidLink, name)
	case name == "." || name == "..":
		return fmt.Errorf("%w: %q", ErrInvalidLink, name)
	case strings.ContainsAny(name, "/: \t\n\r\x00"):
		return fmt.Errorf("%w: %q contains '/', ':', NUL or whitespace", ErrInvalidLink, name)
	case strings.HasPrefix(name, IFBPrefix):
		return fmt.Errorf("%w: %q is an ARS IFB device, not a VM link", ErrInvalidLink, name)
	}
	return nil
}

func validate(link string, rate uint64) error {
	if err := ValidateLink(link); err != nil {
		return err
	}
	return ValidateRate(rate)
}

// Burst returns the HTB burst (buffer and cbuffer) in bytes for a rate in
// bits per second: max(10 ms at the rate, MinBurst). See the package
// documentation for why.
func Burst(rate uint64) uint32 {
	b := rate / 8 / 100
	if b < MinBurst {
		b = MinBurst
	}
	return uint32(b) // ≤ MaxRate/800 = 1.25e8, fits
}

// IFBName returns the name of the IFB device that carries link's upload:
// IFBPrefix + the FNV-1a hash of the link name in 8 hex digits (14 bytes),
// stable across restarts so Clear finds it even after the tap vanished.
func IFBName(link string) string {
	h := fnv.New32a()
	_, _ = h.Write([]byte(link))
	return fmt.Sprintf("%s%08x", IFBPrefix, h.Sum32())
}
