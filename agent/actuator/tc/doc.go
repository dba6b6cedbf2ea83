// Package tc owns ARS's network bandwidth actuator: the only code that
// changes Linux traffic control for a VM's tap device.
//
// What it owns on a tap named L (and nothing else):
//
//   - Egress (host → VM, the VM's download): an HTB root qdisc with handle
//     a125: (chosen to differ from libvirt's 1:) whose default class a125:1
//     carries the rate. The kernel's default leaf (pfifo) queues under it.
//   - Ingress (VM → host, the VM's upload): an ingress qdisc (ffff:) on L
//     with one u32 match-all filter at priority 0xa125 whose mirred action
//     redirects every packet to an IFB device named IFBName(L)
//     ("arsifb" + 8 hex digits), and on that IFB the same HTB root + class
//     as for egress.
//
// Why IFB and not a police action: policing drops whatever exceeds the
// bucket, which makes TCP saw-tooth well below the set rate and drops
// packets by design; an IFB queues the upload and shapes it exactly like
// the egress side, so both directions share one code path and one set of
// numbers. (On the lab kernels CONFIG_NET_ACT_POLICE is also not built,
// while IFB, mirred and u32 are.)
//
// Rate changes are made in place: an existing class is changed with
// RTM_NEWTCLASS without NLM_F_CREATE/EXCL ("tc class change"), so the
// qdisc, its queue and its counters survive and no packet is dropped by the
// update itself. Only the first Set on a link replaces the kernel's default
// root qdisc (noqueue/pfifo_fast/mq, handle 0:) — whatever that default
// queue held at that instant is the one cost of installing shaping. A root
// qdisc ARS did not install (any non-default handle other than a125:) is
// never touched: Set returns ErrForeign.
//
// Burst: HTB buffer and cbuffer are Burst(rate) = max(10 ms at the rate,
// 32 KiB). Ten milliseconds keeps HTB accurate above timer granularity at
// high rates without letting a VM exceed its rate for long; the 32 KiB floor
// (about 20 full frames, more than a TCP initial window) keeps low rates from
// queueing every small burst. Large GSO packets are not a problem for HTB:
// a class may go briefly into debt and then waits. ceil equals rate (one
// class, nothing to borrow from).
//
// Netlink is the real implementation (vishvananda/netlink, working inside a
// given network namespace); Fake is an in-memory Shaper that records calls
// for executor tests.
package tc
