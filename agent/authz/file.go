package authz

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/user"
	"regexp"
	"sort"
	"strconv"

	"go.yaml.in/yaml/v3"
	"golang.org/x/sys/unix"

	"github.com/ars-dev/ars/synthesizer"
)

// MaxPolicyFile bounds the policy file.
const MaxPolicyFile = 1 << 20

// maxEntries bounds the users, groups and VMs named in one policy.
const maxEntries = 10000

// File is the policy file's schema:
//
//	roles:
//	  admin:    {users: [alice], groups: [ars-admins]}
//	  operator: {users: ["1001"]}
//	  viewer:   {groups: [adm]}
//	tenants:
//	  acme:
//	    users: [bob]
//	    groups: [acme]
//	    vms: [web-1, web-2]
//
// Users and groups are names (resolved when the file is loaded; an unknown
// name is an error) or decimal ids. Unknown keys are errors.
type File struct {
	Roles   Roles             `yaml:"roles"`
	Tenants map[string]Tenant `yaml:"tenants"`
}

// Roles lists the principals holding each fleet-wide role.
type Roles struct {
	Admin    Principals `yaml:"admin"`
	Operator Principals `yaml:"operator"`
	Viewer   Principals `yaml:"viewer"`
}

// Principals are users and groups.
type Principals struct {
	Users  []string `yaml:"users"`
	Groups []string `yaml:"groups"`
}

// Tenant owns VMs: its members may read and set their SLAs.
type Tenant struct {
	Users  []string `yaml:"users"`
	Groups []string `yaml:"groups"`
	VMs    []string `yaml:"vms"`
}

// Resolver turns user and group names into ids.
type Resolver interface {
	LookupUser(name string) (uint32, error)
	LookupGroup(name string) (uint32, error)
}

// OSResolver resolves names with os/user (/etc/passwd, /etc/group, or NSS
// when built with cgo).
type OSResolver struct{}

// LookupUser implements Resolver.
func (OSResolver) LookupUser(name string) (uint32, error) {
	u, err := user.Lookup(name)
	if err != nil {
		return 0, err
	}
	n, err := strconv.ParseUint(u.Uid, 10, 32)
	return uint32(n), err
}

// LookupGroup implements Resolver.
func (OSResolver) LookupGroup(name string) (uint32, error) {
	g, err := user.LookupGroup(name)
	if err != nil {
		return 0, err
	}
	n, err := strconv.ParseUint(g.Gid, 10, 32)
	return uint32(n), err
}

var (
	principalName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?$`)
	tenantName    = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$`)
)

// Load reads the policy file at path. It refuses a symlink, a non-regular
// file, a file larger than MaxPolicyFile, and a file that is not owned by
// arsd's effective user or that group or others may write: whoever can
// write the policy can grant themselves admin.
func Load(path string, r Resolver) (*Policy, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		if errors.Is(err, unix.ELOOP) {
			return nil, fmt.Errorf("policy %s: is a symbolic link; refusing to follow it", path)
		}
		return nil, fmt.Errorf("policy %s: %w", path, err)
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("policy %s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return nil, fmt.Errorf("policy %s: not a regular file", path)
	}
	if euid := uint32(os.Geteuid()); st.Uid != euid {
		return nil, fmt.Errorf("policy %s: owned by uid %d, not by arsd's uid %d; refusing it (its owner could grant themselves admin)", path, st.Uid, euid)
	}
	if st.Mode&0o022 != 0 {
		return nil, fmt.Errorf("policy %s: mode %04o lets group or others write it; refusing it (chmod go-w)", path, st.Mode&0o7777)
	}
	if st.Size > MaxPolicyFile {
		return nil, fmt.Errorf("policy %s: %d bytes, larger than %d", path, st.Size, MaxPolicyFile)
	}
	b, err := io.ReadAll(io.LimitReader(f, MaxPolicyFile+1))
	if err != nil {
		return nil, fmt.Errorf("policy %s: %w", path, err)
	}
	p, err := Parse(b, r)
	if err != nil {
		return nil, fmt.Errorf("policy %s: %w", path, err)
	}
	p.source = path
	return p, nil
}

// Parse builds a policy from the file's bytes. Errors name the offending
// key or entry.
func Parse(b []byte, r Resolver) (*Policy, error) {
	if len(b) > MaxPolicyFile {
		return nil, fmt.Errorf("%d bytes, larger than %d", len(b), MaxPolicyFile)
	}
	var f File
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&f); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("parse: %w", err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return nil, errors.New("parse: more than one YAML document")
	}
	p := RootOnly()
	p.source = "policy"
	entries := 0
	count := func(n int) error {
		entries += n
		if entries > maxEntries {
			return fmt.Errorf("more than %d users, groups and VMs", maxEntries)
		}
		return nil
	}
	for _, rg := range []struct {
		role Role
		pr   Principals
	}{{Admin, f.Roles.Admin}, {Operator, f.Roles.Operator}, {Viewer, f.Roles.Viewer}} {
		if err := count(len(rg.pr.Users) + len(rg.pr.Groups)); err != nil {
			return nil, err
		}
		where := "roles." + rg.role.String()
		uids, err := resolveAll(rg.pr.Users, r.LookupUser, where+".users", "user")
		if err != nil {
			return nil, err
		}
		gids, err := resolveAll(rg.pr.Groups, r.LookupGroup, where+".groups", "group")
		if err != nil {
			return nil, err
		}
		for _, u := range uids {
			if rg.role > p.users[u] {
				p.users[u] = rg.role
			}
		}
		for _, g := range gids {
			if rg.role > p.groups[g] {
				p.groups[g] = rg.role
			}
		}
	}
	names := make([]string, 0, len(f.Tenants))
	for n := range f.Tenants {
		names = append(names, n)
	}
	sort.Strings(names)
	owner := map[string]string{}
	for _, n := range names {
		t := f.Tenants[n]
		where := "tenants." + n
		if !tenantName.MatchString(n) {
			return nil, fmt.Errorf("tenants: bad tenant name %q (letters, digits, '_', '.', '-'; at most 63)", n)
		}
		if err := count(len(t.Users) + len(t.Groups) + len(t.VMs)); err != nil {
			return nil, err
		}
		if len(t.Users)+len(t.Groups) == 0 {
			return nil, fmt.Errorf("%s: no users and no groups", where)
		}
		if len(t.VMs) == 0 {
			return nil, fmt.Errorf("%s.vms: empty; a tenant owns at least one VM", where)
		}
		uids, err := resolveAll(t.Users, r.LookupUser, where+".users", "user")
		if err != nil {
			return nil, err
		}
		gids, err := resolveAll(t.Groups, r.LookupGroup, where+".groups", "group")
		if err != nil {
			return nil, err
		}
		tt := tenant{name: n, users: map[uint32]bool{}, groups: map[uint32]bool{}, vms: map[string]bool{}}
		for _, u := range uids {
			tt.users[u] = true
		}
		for _, g := range gids {
			tt.groups[g] = true
		}
		for _, v := range t.VMs {
			if !synthesizer.ValidVMName(v) {
				return nil, fmt.Errorf("%s.vms: bad VM name %q", where, v)
			}
			if o, ok := owner[v]; ok && o != n {
				return nil, fmt.Errorf("%s.vms: VM %s is already owned by tenant %s; a VM has one owner", where, v, o)
			}
			owner[v] = n
			tt.vms[v] = true
		}
		p.tenants = append(p.tenants, tt)
	}
	return p, nil
}

func resolveAll(in []string, lookup func(string) (uint32, error), where, kind string) ([]uint32, error) {
	out := make([]uint32, 0, len(in))
	for _, s := range in {
		id, numeric, err := parseID(s)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", where, err)
		}
		if !numeric {
			if !principalName.MatchString(s) {
				return nil, fmt.Errorf("%s: bad %s name %q", where, kind, s)
			}
			if id, err = lookup(s); err != nil {
				return nil, fmt.Errorf("%s: unknown %s %q: %w", where, kind, s, err)
			}
		}
		out = append(out, id)
	}
	return out, nil
}
