package authz

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// fakeResolver resolves a fixed set of names.
type fakeResolver struct{ users, groups map[string]uint32 }

func (f fakeResolver) LookupUser(n string) (uint32, error) {
	if id, ok := f.users[n]; ok {
		return id, nil
	}
	return 0, fmt.Errorf("no such user")
}

func (f fakeResolver) LookupGroup(n string) (uint32, error) {
	if id, ok := f.groups[n]; ok {
		return id, nil
	}
	return 0, fmt.Errorf("no such group")
}

var names = fakeResolver{
	users:  map[string]uint32{"alice": 1000, "bob": 1001, "carol": 1002, "dave": 1003},
	groups: map[string]uint32{"ars-admins": 500, "adm": 4, "acme": 600},
}

const sample = `
roles:
  admin:    {users: [alice], groups: [ars-admins]}
  operator: {users: ["2000"]}
  viewer:   {users: [carol], groups: [adm]}
tenants:
  acme:
    users: [bob]
    groups: [acme]
    vms: [web-1, web-2]
  beta:
    users: [dave, 2000]
    vms: [db]
`

func mustParse(t *testing.T, s string) *Policy {
	t.Helper()
	p, err := Parse([]byte(s), names)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestDecide(t *testing.T) {
	p := mustParse(t, sample)
	read := func(vm string) Op { return Op{Method: "sla.get", Access: Read, VM: vm} }
	write := func(vm string) Op { return Op{Method: "sla.set", Access: Write, VM: vm} }
	fleet := Op{Method: "status", Access: Read}
	vms := Op{Method: "vms", Access: Read, Filterable: true}
	manage := Op{Method: "reload", Access: Manage}
	cases := []struct {
		name  string
		id    Identity
		op    Op
		allow bool
		scope string // for filtered reads: the VMs, comma-separated
	}{
		{"root manages", Identity{UID: 0, GID: 0}, manage, true, ""},
		{"admin by name", Identity{UID: 1000, GID: 1000}, manage, true, ""},
		{"admin by supplementary group", Identity{UID: 3000, GID: 3000, Groups: []uint32{500}}, manage, true, ""},
		{"admin by primary group", Identity{UID: 3000, GID: 500}, write("db"), true, ""},
		{"operator sets any SLA", Identity{UID: 2000, GID: 2000}, write("web-1"), true, ""},
		{"operator may not manage", Identity{UID: 2000, GID: 2000}, manage, false, ""},
		{"viewer reads fleet", Identity{UID: 1002, GID: 1002}, fleet, true, ""},
		{"viewer by group reads a VM", Identity{UID: 3000, GID: 3000, Groups: []uint32{4}}, read("db"), true, ""},
		{"viewer may not set", Identity{UID: 1002, GID: 1002}, write("db"), false, ""},
		{"tenant sets own", Identity{UID: 1001, GID: 1001}, write("web-2"), true, ""},
		{"tenant reads own", Identity{UID: 1001, GID: 1001}, read("web-1"), true, ""},
		{"tenant by group sets own", Identity{UID: 4000, GID: 4000, Groups: []uint32{600}}, write("web-1"), true, ""},
		{"tenant may not set other", Identity{UID: 1001, GID: 1001}, write("db"), false, ""},
		{"tenant may not read other", Identity{UID: 1001, GID: 1001}, read("db"), false, ""},
		{"tenant may not read status", Identity{UID: 1001, GID: 1001}, fleet, false, ""},
		{"tenant reads vms filtered", Identity{UID: 1001, GID: 1001}, vms, true, "web-1,web-2"},
		{"tenant may not manage", Identity{UID: 1001, GID: 1001}, manage, false, ""},
		{"two tenancies", Identity{UID: 1003, GID: 1003, Groups: []uint32{600}}, vms, true, "db,web-1,web-2"},
		{"stranger denied read", Identity{UID: 65534, GID: 65534}, read("db"), false, ""},
		{"stranger denied fleet", Identity{UID: 65534, GID: 65534}, vms, false, ""},
		{"stranger denied write", Identity{UID: 65534, GID: 65534}, write("db"), false, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := p.Decide(c.id, c.op)
			if d.Allow != c.allow {
				t.Fatalf("allow = %v (%s), want %v", d.Allow, d.Reason, c.allow)
			}
			if d.Reason == "" {
				t.Fatal("no reason")
			}
			if got := strings.Join(sortedKeys(d.VMs), ","); got != c.scope {
				t.Fatalf("scope %q, want %q", got, c.scope)
			}
			if d.Allow && c.scope == "" && d.VMs != nil {
				t.Fatal("unscoped allow carries a VM scope")
			}
		})
	}
}

func TestRootOnly(t *testing.T) {
	p := RootOnly()
	if p.Shared() {
		t.Fatal("root-only policy is shared")
	}
	if !p.Decide(Identity{UID: 0}, Op{Method: "sla.set", Access: Write, VM: "x"}).Allow {
		t.Fatal("root denied")
	}
	for _, a := range []Access{Read, Write, Manage} {
		if d := p.Decide(Identity{UID: 1000, GID: 1000}, Op{Method: "m", Access: a, VM: "x"}); d.Allow {
			t.Fatalf("%v allowed to uid 1000: %s", a, d.Reason)
		}
	}
	if !mustParse(t, sample).Shared() {
		t.Fatal("sample policy not shared")
	}
	if p := mustParse(t, ""); p.Shared() || p.Known(Identity{UID: 5}) {
		t.Fatal("empty file grants something")
	}
}

func TestParseErrors(t *testing.T) {
	cases := map[string]string{
		"unknown key":        "roles:\n  admins: {users: [alice]}\n",
		"unknown top key":    "role: {}\n",
		"unknown user":       "roles:\n  viewer: {users: [mallory]}\n",
		"unknown group":      "roles:\n  viewer: {groups: [nope]}\n",
		"bad name":           "roles:\n  viewer: {users: [\"a b\"]}\n",
		"id out of range":    "roles:\n  viewer: {users: [\"4294967295\"]}\n",
		"tenant without vms": "tenants:\n  t: {users: [bob]}\n",
		"tenant nobody":      "tenants:\n  t: {vms: [a]}\n",
		"bad vm":             "tenants:\n  t: {users: [bob], vms: [\"../x\"]}\n",
		"vm two owners":      "tenants:\n  t: {users: [bob], vms: [a]}\n  u: {users: [carol], vms: [a]}\n",
		"bad tenant":         "tenants:\n  \"-t\": {users: [bob], vms: [a]}\n",
		"two documents":      "roles: {}\n---\nroles: {}\n",
		"not a map":          "- 1\n",
	}
	for name, in := range cases {
		t.Run(name, func(t *testing.T) {
			if _, err := Parse([]byte(in), names); err == nil {
				t.Fatalf("accepted:\n%s", in)
			}
		})
	}
	if _, err := Parse(make([]byte, MaxPolicyFile+1), names); err == nil {
		t.Fatal("oversized accepted")
	}
	_, err := Parse([]byte("roles:\n  viewer: {users: [mallory]}\n"), names)
	if !strings.Contains(err.Error(), "roles.viewer.users") || !strings.Contains(err.Error(), "mallory") {
		t.Fatalf("error does not name the entry: %v", err)
	}
}

func TestLoadFileChecks(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "policy.yaml")
	if err := os.WriteFile(good, []byte(sample), 0o644); err != nil {
		t.Fatal(err)
	}
	if p, err := Load(good, names); err != nil || p.Source() != good {
		t.Fatalf("good file: %v", err)
	}
	link := filepath.Join(dir, "link.yaml")
	if err := os.Symlink(good, link); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(link, names); err == nil || !strings.Contains(err.Error(), "symbolic link") {
		t.Fatalf("symlink: %v", err)
	}
	writable := filepath.Join(dir, "writable.yaml")
	if err := os.WriteFile(writable, []byte(sample), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(writable, 0o666); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(writable, names); err == nil || !strings.Contains(err.Error(), "write") {
		t.Fatalf("world-writable: %v", err)
	}
	if _, err := Load(dir, names); err == nil {
		t.Fatal("directory accepted")
	}
	if _, err := Load(filepath.Join(dir, "none"), names); err == nil {
		t.Fatal("missing file accepted")
	}
	big := filepath.Join(dir, "big.yaml")
	if err := os.WriteFile(big, make([]byte, MaxPolicyFile+1), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(big, names); err == nil || !strings.Contains(err.Error(), "larger") {
		t.Fatalf("big: %v", err)
	}
	if os.Geteuid() == 0 {
		other := filepath.Join(dir, "other.yaml")
		if err := os.WriteFile(other, []byte(sample), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(other, 65534, 65534); err != nil {
			t.Fatal(err)
		}
		if _, err := Load(other, names); err == nil || !strings.Contains(err.Error(), "owned by uid 65534") {
			t.Fatalf("foreign owner: %v", err)
		}
	}
}
