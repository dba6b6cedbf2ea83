#!/bin/sh
# Regenerates bpf/include/vmlinux.h from the running kernel's BTF.
# The Makefile's `vmlinux` target runs this; the output is committed so that
# `make generate` needs only clang.
set -eu
here=$(dirname "$0")
btf=${BTF:-/sys/kernel/btf/vmlinux}
bpftool btf dump file "$btf" format c > "$here/include/vmlinux.h.tmp"
mv "$here/include/vmlinux.h.tmp" "$here/include/vmlinux.h"
