// Package authz owns who may do what through arsd's control socket: the
// policy file (strict YAML, bounded, root-owned and not writable by
// others) that maps users and groups to roles — viewer (read), operator
// (read and change SLAs), admin (everything) — and tenants to the VMs
// they own, and Decide, which turns a peer's kernel-recorded identity
// (SO_PEERCRED uid/gid/pid, SO_PEERGROUPS) and an operation into allow or
// deny with a reason. Root is always admin. Without a policy file only
// root may use the socket.
package authz

import (
	"fmt"
	"sort"
	"strconv"
	"strings"
)

// Role is a fleet-wide grant. Roles are ordered: each includes the ones
// below it.
type Role int

// Roles, weakest first.
const (
	NoRole Role = iota
	Viewer
	Operator
	Admin
)

func (r Role) String() string {
	switch r {
	case Viewer:
		return "viewer"
	case Operator:
		return "operator"
	case Admin:
		return "admin"
	default:
		return "none"
	}
}

// Access is what an operation needs.
type Access int

// Accesses.
const (
	// Read reads state: fleet-wide (VM "") needs viewer; one VM needs
	// viewer or ownership of the VM as a tenant.
	Read Access = iota
	// Write changes a VM's SLA: operator, or the VM's tenant.
	Write
	// Manage is everything else that changes the agent: admin only.
	Manage
)

func (a Access) String() string {
	switch a {
	case Read:
		return "read"
	case Write:
		return "write"
	default:
		return "manage"
	}
}

// Identity is a peer as the kernel recorded it.
type Identity struct {
	PID    int32
	UID    uint32
	GID    uint32
	Groups []uint32 // supplementary groups (SO_PEERGROUPS)
}

func (id Identity) String() string {
	return fmt.Sprintf("uid=%d gid=%d pid=%d", id.UID, id.GID, id.PID)
}

// Op is one control call to decide on.
type Op struct {
	Method string
	Access Access
	// VM is the VM the call is about; "" for fleet-wide calls.
	VM string
	// Filterable marks a fleet-wide read whose answer the caller can cut
	// down to the VMs a tenant owns (Decision.VMs).
	Filterable bool
}

// Decision is the answer to Decide.
type Decision struct {
	Allow  bool
	Reason string
	Role   Role
	// VMs, when non-nil, restricts an allowed fleet-wide read to these VMs.
	VMs map[string]bool
}

// Policy is a loaded policy. The zero value is unusable; use RootOnly,
// Parse or Load. Immutable once built, so safe for concurrent use.
type Policy struct {
	users   map[uint32]Role
	groups  map[uint32]Role
	tenants []tenant
	source  string
}

type tenant struct {
	name   string
	users  map[uint32]bool
	groups map[uint32]bool
	vms    map[string]bool
}

// RootOnly is the policy in force without a policy file.
func RootOnly() *Policy {
	return &Policy{users: map[uint32]Role{}, groups: map[uint32]Role{}, source: "built-in root-only policy"}
}

// Source says where the policy came from, for logs.
func (p *Policy) Source() string { return p.source }

// Shared reports whether anyone other than root holds a grant: the
// control socket must then be reachable by other users (mode 0666 in a
// traversable directory), authorization being done here per call.
func (p *Policy) Shared() bool {
	for uid := range p.users {
		if uid != 0 {
			return true
		}
	}
	return len(p.groups) > 0 || len(p.tenants) > 0
}

// Summary describes the grants in one line, for logs.
func (p *Policy) Summary() string {
	count := map[Role]int{}
	for _, r := range p.users {
		count[r]++
	}
	for _, r := range p.groups {
		count[r]++
	}
	var vms int
	for _, t := range p.tenants {
		vms += len(t.vms)
	}
	return fmt.Sprintf("admin grants %d, operator grants %d, viewer grants %d, tenants %d owning %d VMs",
		count[Admin], count[Operator], count[Viewer], len(p.tenants), vms)
}

// role is the strongest role id holds through its uid, gid or groups.
func (p *Policy) role(id Identity) (Role, string) {
	best, via := NoRole, ""
	consider := func(r Role, what string) {
		if r > best {
			best, via = r, what
		}
	}
	consider(p.users[id.UID], fmt.Sprintf("uid %d", id.UID))
	consider(p.groups[id.GID], fmt.Sprintf("gid %d", id.GID))
	for _, g := range id.Groups {
		consider(p.groups[g], fmt.Sprintf("group %d", g))
	}
	return best, via
}

// member reports whether id belongs to tenant t.
func (t *tenant) member(id Identity) bool {
	if t.users[id.UID] || t.groups[id.GID] {
		return true
	}
	for _, g := range id.Groups {
		if t.groups[g] {
			return true
		}
	}
	return false
}

// owned returns the VMs id owns as a tenant, and the tenants' names.
func (p *Policy) owned(id Identity) (map[string]bool, []string) {
	var vms map[string]bool
	var names []string
	for i := range p.tenants {
		t := &p.tenants[i]
		if !t.member(id) {
			continue
		}
		names = append(names, t.name)
		if vms == nil {
			vms = map[string]bool{}
		}
		for v := range t.vms {
			vms[v] = true
		}
	}
	return vms, names
}

// Known reports whether id holds any grant at all (a role or a tenancy).
func (p *Policy) Known(id Identity) bool {
	if id.UID == 0 {
		return true
	}
	if r, _ := p.role(id); r > NoRole {
		return true
	}
	vms, _ := p.owned(id)
	return vms != nil
}

// Decide says whether id may perform op, and why.
func (p *Policy) Decide(id Identity, op Op) Decision {
	if id.UID == 0 {
		return Decision{Allow: true, Role: Admin, Reason: "uid 0 (root) is admin"}
	}
	role, via := p.role(id)
	need := map[Access]Role{Read: Viewer, Write: Operator, Manage: Admin}[op.Access]
	if role >= need {
		return Decision{Allow: true, Role: role, Reason: fmt.Sprintf("%s has role %s", via, role)}
	}
	who := fmt.Sprintf("uid %d (gid %d)", id.UID, id.GID)
	if role > NoRole {
		who = fmt.Sprintf("%s with role %s", who, role)
	}
	deny := func(format string, a ...any) Decision {
		return Decision{Role: role, Reason: who + " " + fmt.Sprintf(format, a...)}
	}
	if op.Access == Manage {
		return deny("may not call %s: it needs the admin role", op.Method)
	}
	vms, tenants := p.owned(id)
	tn := strings.Join(tenants, ",")
	if op.VM != "" {
		if vms[op.VM] {
			return Decision{Allow: true, Role: role,
				Reason: fmt.Sprintf("%s is tenant %s, owner of VM %s", who, tn, op.VM)}
		}
		if len(tenants) > 0 {
			return deny("(tenant %s) does not own VM %s; %s needs the %s role for other VMs", tn, op.VM, op.Method, need)
		}
		return deny("may not %s VM %s: %s needs the %s role or ownership of the VM", op.Access, op.VM, op.Method, need)
	}
	if op.Access == Read && op.Filterable && len(tenants) > 0 {
		return Decision{Allow: true, Role: role, VMs: vms,
			Reason: fmt.Sprintf("%s is tenant %s: answer limited to its VMs (%s)", who, tn, strings.Join(sortedKeys(vms), ","))}
	}
	return deny("may not call %s: it needs the %s role", op.Method, need)
}

func sortedKeys(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// parseID reads a decimal id; ok is false when s is not all digits.
func parseID(s string) (uint32, bool, error) {
	if s == "" || strings.Trim(s, "0123456789") != "" {
		return 0, false, nil
	}
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil || n == 1<<32-1 {
		return 0, true, fmt.Errorf("id %s out of range [0, 4294967294]", s)
	}
	return uint32(n), true, nil
}
