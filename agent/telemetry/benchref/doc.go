// Command benchref is `make bench-bpf`: it measures, with the kernel's BPF
// run-time statistics, what ARS's telemetry programs cost per event next to
// a textbook runqlat (bpf/bench/ref.bpf.c, libbpf-tools' design),
// side by side in one run under a context-switch storm, for an untracked
// and a tracked load.
package main

//go:generate go tool bpf2go -tags linux -target bpfel ref ../../../bpf/bench/ref.bpf.c -- -I../../../bpf/include -I../../../bpf
