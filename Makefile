# Millrace: common tasks. Needs only a Rust toolchain (cargo).

CARGO ?= cargo
SHELL := /bin/bash

.PHONY: build test demo bench lint fmt clean

build:
	$(CARGO) build --workspace --all-targets

# Runs every test, then adds up cargo's per-binary summaries into one closing line.
test:
	@mkdir -p build
	set -o pipefail; $(CARGO) test --workspace --no-fail-fast 2>&1 | tee build/test.log
	@awk '/^test result:/ {p += $$4; f += $$6} END {printf "all tests: %d passed, %d failed\n", p, f}' build/test.log

demo:
	$(CARGO) run --bin millrace -- demo

bench:
	$(CARGO) run --release --bin millrace -- bench vdaf

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
