package synthesizer

// Touch records a change of vm's allocation made outside the engine (an
// adopted drift), so the minimum dwell applies from now before a shrink.
func (e *Engine) Touch(vm string) { e.lastChange[vm] = e.now() }
