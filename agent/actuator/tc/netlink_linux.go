package tc

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Handles and priorities ARS uses; see the package documentation.
const (
	rootMajor  = 0xa125
	filterPrio = 0xa125
	ifbTxQLen  = 1000
	// DefaultTimeout bounds each netlink round trip (socket receive timeout).
	DefaultTimeout = 5 * time.Second
)

var (
	rootHandle    = netlink.MakeHandle(rootMajor, 0)
	classHandle   = netlink.MakeHandle(rootMajor, 1)
	ingressHandle = netlink.MakeHandle(0xffff, 0)
)

// Netlink is the real Shaper. It talks rtnetlink inside one network
// namespace (the one given to New). Calls are serialised.
type Netlink struct {
	mu sync.Mutex
	h  *netlink.Handle
}

var _ Shaper = (*Netlink)(nil)

// New returns a Shaper working in network namespace ns; netns.None() means
// the caller's current namespace. Close releases the netlink socket.
func New(ns netns.NsHandle) (*Netlink, error) {
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("tc: netlink handle: %w", err)
	}
	if err := h.SetSocketTimeout(DefaultTimeout); err != nil {
		h.Close()
		return nil, fmt.Errorf("tc: netlink timeout: %w", err)
	}
	return &Netlink{h: h}, nil
}

// Close releases the netlink socket.
func (n *Netlink) Close() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.h != nil {
		n.h.Close()
		n.h = nil
	}
}

func (n *Netlink) link(name string) (netlink.Link, error) {
	l, err := n.h.LinkByName(name)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) || errors.Is(err, unix.ENODEV) {
			return nil, fmt.Errorf("%w: %s", ErrNoLink, name)
		}
		return nil, fmt.Errorf("tc: link %s: %w", name, err)
	}
	return l, nil
}

// htbClass builds ARS's class for a link index and rate (bits/s).
func htbClass(index int, rate uint64) *netlink.HtbClass {
	burst := Burst(rate)
	quantum := rate / 8 / 10 // r2q 10, bounded as tc advises
	if quantum < 1600 {
		quantum = 1600
	}
	if quantum > 200000 {
		quantum = 200000
	}
	return netlink.NewHtbClass(netlink.ClassAttrs{
		LinkIndex: index,
		Parent:    rootHandle,
		Handle:    classHandle,
	}, netlink.HtbClassAttrs{
		Rate:    rate,
		Ceil:    rate,
		Buffer:  burst,
		Cbuffer: burst,
		Quantum: uint32(quantum),
	})
}

func rootQdisc(qs []netlink.Qdisc) netlink.Qdisc {
	for _, q := range qs {
		if q.Attrs().Parent == netlink.HANDLE_ROOT {
			return q
		}
	}
	return nil
}

func (n *Netlink) ourClass(l netlink.Link) (*netlink.HtbClass, error) {
	cs, err := n.h.ClassList(l, rootHandle)
	if err != nil {
		return nil, fmt.Errorf("tc: class list %s: %w", l.Attrs().Name, err)
	}
	for _, c := range cs {
		if hc, ok := c.(*netlink.HtbClass); ok && c.Attrs().Handle == classHandle {
			return hc, nil
		}
	}
	return nil, nil
}

// shape installs or changes the HTB shaping on l's egress.
func (n *Netlink) shape(ctx context.Context, l netlink.Link, rate uint64) (bool, error) {
	name := l.Attrs().Name
	qs, err := n.h.QdiscList(l)
	if err != nil {
		return false, fmt.Errorf("tc: qdisc list %s: %w", name, err)
	}
	want := htbClass(l.Attrs().Index, rate)
	root := rootQdisc(qs)
	switch {
	case root != nil && root.Attrs().Handle == rootHandle:
		if _, ok := root.(*netlink.Htb); !ok {
			return false, fmt.Errorf("%w: %s root a125: is %s, not htb", ErrForeign, name, root.Type())
		}
		cur, err := n.ourClass(l)
		if err != nil {
			return false, err
		}
		if cur != nil {
			if cur.Rate == want.Rate && cur.Ceil == want.Ceil && cur.Buffer == want.Buffer &&
				cur.Cbuffer == want.Cbuffer && cur.Quantum == want.Quantum {
				return false, nil
			}
			if err := ctx.Err(); err != nil {
				return false, err
			}
			// In place: RTM_NEWTCLASS without CREATE — the queue survives.
			if err := n.h.ClassChange(want); err != nil {
				return false, fmt.Errorf("tc: class change %s: %w", name, err)
			}
			return true, nil
		}
		if err := n.h.ClassAdd(want); err != nil {
			return false, fmt.Errorf("tc: class add %s: %w", name, err)
		}
		return true, nil
	case root == nil || root.Attrs().Handle>>16 == 0:
		// The kernel's default root (noqueue, pfifo_fast, mq: handle 0:).
		if err := ctx.Err(); err != nil {
			return false, err
		}
		q := netlink.NewHtb(netlink.QdiscAttrs{
			LinkIndex: l.Attrs().Index,
			Handle:    rootHandle,
			Parent:    netlink.HANDLE_ROOT,
		})
		q.Defcls = 1
		if err := n.h.QdiscReplace(q); err != nil {
			return false, fmt.Errorf("tc: qdisc replace %s root htb: %w", name, err)
		}
		if err := n.h.ClassAdd(want); err != nil {
			return false, fmt.Errorf("tc: class add %s: %w", name, err)
		}
		return true, nil
	default:
		return false, fmt.Errorf("%w: %s root qdisc %s %s", ErrForeign, name, root.Type(), netlink.HandleStr(root.Attrs().Handle))
	}
}

// egressRate reads ARS's HTB rate on l, 0 if none.
func (n *Netlink) egressRate(l netlink.Link) (uint64, error) {
	qs, err := n.h.QdiscList(l)
	if err != nil {
		return 0, fmt.Errorf("tc: qdisc list %s: %w", l.Attrs().Name, err)
	}
	root := rootQdisc(qs)
	if root == nil || root.Attrs().Handle != rootHandle || root.Type() != "htb" {
		return 0, nil
	}
	c, err := n.ourClass(l)
	if err != nil || c == nil {
		return 0, err
	}
	return c.Rate * 8, nil
}

// SetEgress implements Shaper: shapes the tap's egress (VM download).
func (n *Netlink) SetEgress(ctx context.Context, link string, rate uint64) (bool, error) {
	if err := validate(link, rate); err != nil {
		return false, err
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return false, err
	}
	l, err := n.link(link)
	if err != nil {
		return false, err
	}
	return n.shape(ctx, l, rate)
}

// ensureIFB returns the IFB for link, creating it and bringing it up.
func (n *Netlink) ensureIFB(name string) (netlink.Link, bool, error) {
	l, err := n.link(name)
	wrote := false
	switch {
	case err == nil:
		if l.Type() != "ifb" {
			return nil, false, fmt.Errorf("%w: %s exists and is a %s, not an ifb", ErrForeign, name, l.Type())
		}
	case errors.Is(err, ErrNoLink):
		if err := n.h.LinkAdd(&netlink.Ifb{LinkAttrs: netlink.LinkAttrs{Name: name, TxQLen: ifbTxQLen}}); err != nil {
			return nil, false, fmt.Errorf("tc: create ifb %s: %w", name, err)
		}
		wrote = true
		if l, err = n.link(name); err != nil {
			return nil, true, err
		}
	default:
		return nil, false, err
	}
	if l.Attrs().Flags&net.FlagUp == 0 {
		if err := n.h.LinkSetUp(l); err != nil {
			return nil, wrote, fmt.Errorf("tc: set %s up: %w", name, err)
		}
		wrote = true
	}
	return l, wrote, nil
}

// ingressQdisc reports whether l has an ingress qdisc; a clsact (or other
// qdisc at the ingress hook) is foreign.
func (n *Netlink) ingressQdisc(l netlink.Link) (bool, error) {
	qs, err := n.h.QdiscList(l)
	if err != nil {
		return false, fmt.Errorf("tc: qdisc list %s: %w", l.Attrs().Name, err)
	}
	for _, q := range qs {
		if q.Attrs().Parent != netlink.HANDLE_INGRESS {
			continue
		}
		if q.Type() != "ingress" {
			return false, fmt.Errorf("%w: %s has %s at the ingress hook", ErrForeign, l.Attrs().Name, q.Type())
		}
		return true, nil
	}
	return false, nil
}

// ourFilter returns ARS's redirect filter on l's ingress and the ifindex it
// redirects to (0 if it is not a single egress redirect).
func (n *Netlink) ourFilter(l netlink.Link) (netlink.Filter, int, error) {
	fs, err := n.h.FilterList(l, ingressHandle)
	if err != nil {
		return nil, 0, fmt.Errorf("tc: filter list %s ingress: %w", l.Attrs().Name, err)
	}
	for _, f := range fs {
		if f.Attrs().Priority != filterPrio {
			continue
		}
		idx := 0
		if u, ok := f.(*netlink.U32); ok && len(u.Actions) == 1 {
			if m, ok := u.Actions[0].(*netlink.MirredAction); ok && m.MirredAction == netlink.TCA_EGRESS_REDIR {
				idx = m.Ifindex
			}
		}
		return f, idx, nil
	}
	return nil, 0, nil
}

func redirectFilter(tap, ifb int) *netlink.U32 {
	return &netlink.U32{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: tap,
			Parent:    ingressHandle,
			Priority:  filterPrio,
			Protocol:  unix.ETH_P_ALL,
		},
		Sel:     nil, // match all
		Actions: []netlink.Action{netlink.NewMirredAction(ifb)},
	}
}

func (n *Netlink) delFilters(l netlink.Link) error {
	f := &netlink.U32{FilterAttrs: netlink.FilterAttrs{
		LinkIndex: l.Attrs().Index,
		Parent:    ingressHandle,
		Priority:  filterPrio,
		Protocol:  unix.ETH_P_ALL,
	}}
	if err := n.h.FilterDel(f); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("tc: filter del %s: %w", l.Attrs().Name, err)
	}
	return nil
}

// SetIngress implements Shaper: shapes the tap's ingress (VM upload) by
// redirecting it to an IFB device and shaping that device's egress.
func (n *Netlink) SetIngress(ctx context.Context, link string, rate uint64) (bool, error) {
	if err := validate(link, rate); err != nil {
		return false, err
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return false, err
	}
	tap, err := n.link(link)
	if err != nil {
		return false, err
	}
	hasIngress, err := n.ingressQdisc(tap) // refuse clsact before creating anything
	if err != nil {
		return false, err
	}
	ifb, wrote, err := n.ensureIFB(IFBName(link))
	if err != nil {
		return wrote, err
	}
	// Shape the IFB before traffic is redirected to it.
	changed, err := n.shape(ctx, ifb, rate)
	wrote = wrote || changed
	if err != nil {
		return wrote, err
	}
	if err := ctx.Err(); err != nil {
		return wrote, err
	}
	if !hasIngress {
		q := &netlink.Ingress{QdiscAttrs: netlink.QdiscAttrs{
			LinkIndex: tap.Attrs().Index,
			Handle:    ingressHandle,
			Parent:    netlink.HANDLE_INGRESS,
		}}
		if err := n.h.QdiscAdd(q); err != nil {
			return wrote, fmt.Errorf("tc: qdisc add %s ingress: %w", link, err)
		}
		wrote = true
	}
	f, target, err := n.ourFilter(tap)
	if err != nil {
		return wrote, err
	}
	if f != nil && target == ifb.Attrs().Index {
		return wrote, nil
	}
	if f != nil {
		// Stale (the IFB was recreated): replace the whole priority.
		if err := n.delFilters(tap); err != nil {
			return wrote, err
		}
		wrote = true
	}
	if err := n.h.FilterAdd(redirectFilter(tap.Attrs().Index, ifb.Attrs().Index)); err != nil {
		return wrote, fmt.Errorf("tc: filter add %s ingress redirect to %s: %w", link, ifb.Attrs().Name, err)
	}
	return true, nil
}

// Get implements Shaper.
func (n *Netlink) Get(ctx context.Context, link string) (Rates, error) {
	if err := ValidateLink(link); err != nil {
		return Rates{}, err
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return Rates{}, err
	}
	tap, err := n.link(link)
	if err != nil {
		return Rates{}, err
	}
	var r Rates
	if r.EgressBitsPerSec, err = n.egressRate(tap); err != nil {
		return Rates{}, err
	}
	f, target, err := n.ourFilter(tap)
	if err != nil || f == nil || target == 0 {
		return r, err
	}
	ifb, err := n.h.LinkByIndex(target)
	if err != nil || ifb.Attrs().Name != IFBName(link) {
		return r, nil // redirect to something that is not our IFB: not shaped by us
	}
	if r.IngressBitsPerSec, err = n.egressRate(ifb); err != nil {
		return Rates{}, err
	}
	return r, nil
}

// Clear implements Shaper: removes ARS's root qdisc, its ingress filter,
// the ingress qdisc if no filter is left on it, and the IFB. A vanished tap
// is not an error (its qdiscs went with it); its IFB is still removed.
func (n *Netlink) Clear(ctx context.Context, link string) (bool, error) {
	if err := ValidateLink(link); err != nil {
		return false, err
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return false, err
	}
	wrote := false
	tap, err := n.link(link)
	switch {
	case errors.Is(err, ErrNoLink):
	case err != nil:
		return false, err
	default:
		qs, err := n.h.QdiscList(tap)
		if err != nil {
			return false, fmt.Errorf("tc: qdisc list %s: %w", link, err)
		}
		if root := rootQdisc(qs); root != nil && root.Attrs().Handle == rootHandle && root.Type() == "htb" {
			if err := n.h.QdiscDel(root); err != nil {
				return wrote, fmt.Errorf("tc: qdisc del %s root: %w", link, err)
			}
			wrote = true
		}
		f, _, err := n.ourFilter(tap)
		if err != nil {
			return wrote, err
		}
		if f != nil {
			if err := n.delFilters(tap); err != nil {
				return wrote, err
			}
			wrote = true
			// Remove the ingress qdisc if nothing else hangs on it.
			fs, err := n.h.FilterList(tap, ingressHandle)
			if err != nil {
				return wrote, fmt.Errorf("tc: filter list %s ingress: %w", link, err)
			}
			if len(fs) == 0 {
				q := &netlink.Ingress{QdiscAttrs: netlink.QdiscAttrs{
					LinkIndex: tap.Attrs().Index,
					Handle:    ingressHandle,
					Parent:    netlink.HANDLE_INGRESS,
				}}
				if err := n.h.QdiscDel(q); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) {
					return wrote, fmt.Errorf("tc: qdisc del %s ingress: %w", link, err)
				}
			}
		}
	}
	ifb, err := n.link(IFBName(link))
	switch {
	case errors.Is(err, ErrNoLink):
	case err != nil:
		return wrote, err
	case ifb.Type() == "ifb":
		if err := n.h.LinkDel(ifb); err != nil {
			return wrote, fmt.Errorf("tc: delete ifb %s: %w", ifb.Attrs().Name, err)
		}
		wrote = true
	}
	return wrote, nil
}
