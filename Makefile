# ARS — Adaptive Resource Synthesis. Two entry points for a fresh machine:
#   make demo   real VMs under QEMU, arsd on its embedded defaults (~3 min)
#   make test   every test, privileged ones included (run as root)
SHELL := /bin/bash
export PATH := /usr/local/go/bin:$(PATH)
GO      ?= go
BIN     := bin
GUEST   := build/guest
# QEMU accelerator for the demo's guests: tcg here; kvm in the Vagrant box.
ACCEL   ?= tcg
# Debian packages the build, tests and demo use. The guest kernel is not
# installed on the host: guest/build.sh downloads linux-image-*-amd64 and
# busybox-static with `apt-get download` and unpacks them into $(GUEST).
DEB_PKGS := qemu-system-x86 qemu-utils busybox-static cpio kmod iproute2 procps \
            clang llvm libbpf-dev bpftool stress-ng vagrant ca-certificates \
            prometheus systemd libcap2-bin
TEST_FLAGS ?= -count=1 -p 1 -timeout 30m

.PHONY: all build deps guest generate check-generate vmlinux test unit bench bench-bpf bench-ipc fuzz demo clean install

all: build

build:
	@mkdir -p $(BIN)
	$(GO) build -trimpath -o $(BIN)/ ./cmd/...

# Installs what is missing, nothing else. Needs root (apt-get).
deps:
	@missing=$$(for p in $(DEB_PKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "==> installing Debian packages:" $$missing; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $$missing >/dev/null || { echo "apt-get install failed" >&2; exit 1; }; \
	else echo "==> Debian packages present"; fi
	@echo "==> Go modules"; $(GO) mod download

guest: deps
	@guest/build.sh $(GUEST)

# bpf2go outputs are committed; this regenerates them (needs clang).
generate:
	$(GO) generate ./agent/telemetry/...

# Fails when the committed bpf2go outputs differ from a fresh generation.
check-generate:
	@if command -v clang >/dev/null; then \
	  $(MAKE) --no-print-directory generate >/dev/null && git diff --exit-code --stat -- agent/ bpf/ \
	  && echo "==> bpf2go outputs are current"; \
	else echo "==> clang absent: skipping the bpf2go freshness check"; fi

vmlinux:
	bpf/gen-vmlinux.sh

unit:
	$(GO) test -count=1 -short ./...

test: deps guest
	$(GO) vet ./...
	@$(MAKE) --no-print-directory check-generate
	$(GO) test $(TEST_FLAGS) ./...
	@$(MAKE) --no-print-directory fuzz FUZZTIME=$(TEST_FUZZTIME)

bench: deps guest
	$(GO) test -run '^$$' -bench . -benchtime 2s ./...

# eBPF cost per event, ARS's programs next to a textbook runqlat, side by
# side under stress-ng --switch (root; see docs/BENCHMARKS.md). The last
# line is the untracked-load summary: bpf ns/event ars=.. reference=.. ratio=..
bench-bpf:
	@command -v stress-ng >/dev/null || $(MAKE) --no-print-directory deps
	$(GO) run ./agent/telemetry/benchref $(BENCH_BPF_FLAGS)

# Cross-process 64-byte records: the shared-memory ring next to a Unix
# SOCK_SEQPACKET pair and a Go channel (see docs/BENCHMARKS.md, IPC). The
# last line is: ipc ring_msgs_per_s=.. unix_msgs_per_s=.. ratio=.. p99_ns=..
bench-ipc:
	@out=$$($(GO) test -run '^$$' -bench 'IPC64$$' -benchtime 1x -count 1 ./ipc/ 2>&1) || { echo "$$out"; exit 1; }; \
	echo "$$out" | grep -v '^ipc ring_msgs_per_s='; echo "$$out" | grep '^ipc ring_msgs_per_s=' | tail -1

# Runs every fuzz target for FUZZTIME each (plain `go test` runs their
# seed corpora in testdata/fuzz). `make test` runs each for TEST_FUZZTIME,
# a count of inputs rather than a duration (a timed run can end with a
# spurious "context deadline exceeded" from the fuzzing engine), about a
# minute in all. A failing input is written to the package's
# testdata/fuzz/<Target>/ and the run stops.
FUZZTIME ?= 10s
TEST_FUZZTIME ?= 100000x
FUZZ_TARGETS := ./agent/config:FuzzParse ./agent/authz:FuzzParse ./synthesizer:FuzzParseFleet \
                ./predictor:FuzzParseBitbrains ./predictor:FuzzParseLong ./agent/qmp:FuzzDecodeMessage \
                ./agent/executor:FuzzVerify ./ipc:FuzzReadFrame ./ipc:FuzzRingDecode ./ipc:FuzzDecodeEnvelope \
                ./ipc:FuzzDecodeRequest ./cmd/arsd:FuzzControlParams
fuzz:
	@set -e; for t in $(FUZZ_TARGETS); do pkg=$${t%%:*}; fn=$${t##*:}; \
	  echo "==> $$pkg $$fn ($(FUZZTIME))"; \
	  $(GO) test -run '^$$' -fuzz "^$$fn\$$" -fuzztime $(FUZZTIME) -fuzzminimizetime 5s $$pkg; \
	done

demo: deps guest build
	@$(BIN)/ars-demo --arsd $(BIN)/arsd --guest $(GUEST) --accel $(ACCEL)

clean:
	rm -rf $(BIN) build

# Installs the binaries, the systemd unit (ExecStart follows PREFIX) and the
# deploy/ files under $(DESTDIR)$(PREFIX)/share/ars. Does not enable the unit.
PREFIX  ?= /usr/local
UNITDIR ?= /etc/systemd/system
install: build
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(UNITDIR) $(DESTDIR)$(PREFIX)/share/doc/ars \
	  $(DESTDIR)$(PREFIX)/share/ars/prometheus $(DESTDIR)$(PREFIX)/share/ars/grafana $(DESTDIR)$(PREFIX)/share/ars/kubernetes
	install -m 0755 $(BIN)/arsd $(BIN)/arsctl $(DESTDIR)$(PREFIX)/bin/
	sed -e 's#/usr/local/bin/#$(PREFIX)/bin/#g' -e 's#/usr/local/share/#$(PREFIX)/share/#g' \
	  deploy/systemd/arsd.service > $(DESTDIR)$(UNITDIR)/arsd.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/arsd.service
	install -m 0644 README.md docs/*.md $(DESTDIR)$(PREFIX)/share/doc/ars/
	install -m 0644 deploy/prometheus/*.yml $(DESTDIR)$(PREFIX)/share/ars/prometheus/
	cp -R deploy/grafana/. $(DESTDIR)$(PREFIX)/share/ars/grafana/
	install -m 0644 deploy/kubernetes/*.yaml $(DESTDIR)$(PREFIX)/share/ars/kubernetes/
