package synthesizer

import "time"

// Touch records a change of vm's allocation of r made outside the
// Planner (an adopted drift): the minimum dwell runs from now.
func (p *Planner) Touch(vm string, r Resource) {
	lc := p.lastChange[vm]
	if lc == nil {
		lc = new([NumResources]time.Time)
		p.lastChange[vm] = lc
	}
	lc[r] = p.now()
}
