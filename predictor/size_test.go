package predictor

import "unsafe"

func unsafeSizeofARS(m *ARS) uintptr {
	s := unsafe.Sizeof(*m) + unsafe.Sizeof(*m.hw) + unsafe.Sizeof(*m.qr) + unsafe.Sizeof(*m.mx) +
		uintptr(len(m.mx.maxes))*8
	for _, c := range m.cal {
		s += unsafe.Sizeof(*c)
	}
	return s + unsafe.Sizeof(*m.outer)
}
