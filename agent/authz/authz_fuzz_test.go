package authz

import "testing"

// FuzzParse feeds the policy parser arbitrary bytes: no panic, no hang,
// and whatever parses decides consistently (root allowed, a stranger with
// no grant denied). Seeds are in testdata/fuzz/FuzzParse.
func FuzzParse(f *testing.F) {
	f.Add([]byte(sample))
	f.Add([]byte("roles:\n  viewer: {users: [\"0\"]}\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := Parse(b, names)
		if err != nil {
			if p != nil {
				t.Fatal("policy returned with an error")
			}
			return
		}
		op := Op{Method: "sla.set", Access: Write, VM: "web-1"}
		if !p.Decide(Identity{UID: 0}, op).Allow {
			t.Fatal("root denied")
		}
		stranger := Identity{UID: 4294967294, GID: 4294967294}
		if p.Known(stranger) {
			if _, ok := p.users[stranger.UID]; !ok {
				if _, ok := p.groups[stranger.GID]; !ok {
					if vms, _ := p.owned(stranger); vms == nil {
						t.Fatal("Known without a grant")
					}
				}
			}
			return
		}
		for _, a := range []Access{Read, Write, Manage} {
			if d := p.Decide(stranger, Op{Method: "m", Access: a, VM: "web-1", Filterable: true}); d.Allow {
				t.Fatalf("stranger allowed %v: %s", a, d.Reason)
			}
		}
	})
}
