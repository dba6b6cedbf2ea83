package predictor

import "unsafe"

// unsafeSizeofARS is the memory one ARS series holds: the struct, what its
// pointers and slices reach, and the Holt-Winters history.
func unsafeSizeofARS(m *ARS) uintptr {
	s := unsafe.Sizeof(*m) + unsafe.Sizeof(*m.hw) + uintptr(cap(m.hw.scratch))*8 +
		unsafe.Sizeof(*m.qr) + unsafe.Sizeof(*m.mx) + uintptr(len(m.mx.maxes))*8
	s += uintptr(cap(m.hz)) * unsafe.Sizeof(horizonCal{})
	for _, p := range m.pend {
		s += unsafe.Sizeof(p) + uintptr(cap(p))*unsafe.Sizeof(pending{})
	}
	return s + uintptr(cap(m.ahead))*unsafe.Sizeof(Quantiles{})
}
