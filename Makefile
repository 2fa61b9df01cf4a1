# Millrace: common tasks. Needs only a Rust toolchain (cargo).

CARGO ?= cargo

.PHONY: build test demo bench lint fmt clean

build:
	$(CARGO) build --workspace --all-targets

test:
	$(CARGO) test --workspace --no-fail-fast

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
