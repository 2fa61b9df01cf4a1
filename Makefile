# Millrace: common tasks. Needs only a Rust toolchain (cargo).

CARGO ?= cargo
SHELL := /bin/bash

.PHONY: build test e2e demo bench lint fmt clean

build:
	$(CARGO) build --workspace --all-targets

# Runs every test (unit, conformance on the memory bus and on RabbitMQ, NATS and Kafka, the
# end-to-end runs as separate processes), then adds up cargo's per-binary summaries into one
# closing line. The Kafka broker (tansu) is installed into build/ if missing, started on a free
# loopback port, and stopped again; RabbitMQ and NATS are the machine's own.
test:
	@mkdir -p build
	$(CARGO) build --workspace --bins
	scripts/kafka-broker.sh start
	set -o pipefail; trap 'scripts/kafka-broker.sh stop' EXIT; \
	  MILLRACE_TEST_KAFKA=$$(scripts/kafka-broker.sh addr) $(CARGO) test --workspace --no-fail-fast 2>&1 | tee build/test.log
	@awk '/^test result:/ {p += $$4; f += $$6} END {printf "all tests: %d passed, %d failed\n", p, f}' build/test.log

# One end-to-end run as separate processes: make e2e BUS=amqp|nats|kafka
BUS ?= amqp
e2e:
	@mkdir -p build
	$(CARGO) build --workspace --bins
	@if [ "$(BUS)" = kafka ]; then scripts/kafka-broker.sh start; fi
	set -o pipefail; trap 'if [ "$(BUS)" = kafka ]; then scripts/kafka-broker.sh stop; fi' EXIT; \
	  MILLRACE_TEST_KAFKA=$$(if [ "$(BUS)" = kafka ]; then scripts/kafka-broker.sh addr; fi) \
	  $(CARGO) test --test e2e_processes -- --exact e2e_$(subst -,_,$(BUS)) --nocapture

demo:
	$(CARGO) run --bin millrace -- demo

# Benchmarks (not tests): the fleet beside the bare prio + HPKE rate, then each bus's worker loop
# beside the plainest loop its client crate allows (1 KiB bodies).
bench:
	@mkdir -p build
	$(CARGO) build --release --bin millrace
	target/release/millrace bench vdaf
	target/release/millrace bench bus --bus memory://
	target/release/millrace bench bus --bus amqp://guest:guest@127.0.0.1:5672/%2f
	target/release/millrace bench bus --bus nats://127.0.0.1:4222
	scripts/kafka-broker.sh start
	trap 'scripts/kafka-broker.sh stop' EXIT; target/release/millrace bench bus --bus kafka://$$(scripts/kafka-broker.sh addr)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
