# Millrace: common tasks. Needs only a Rust toolchain (cargo).

CARGO ?= cargo
SHELL := /bin/bash

.PHONY: build test e2e demo bench lint fmt clean up images

build:
	$(CARGO) build --workspace --all-targets

# Runs every test (unit, conformance on the memory bus and on RabbitMQ, NATS, Kafka, SNS/SQS and
# Pub/Sub, the cloud stores, the end-to-end runs as separate processes), then adds up cargo's
# per-binary summaries into one closing line. The Kafka broker (tansu) and the cloud emulators
# (moto, the Pub/Sub emulator, fake-gcs-server) are installed into build/ if missing, started on
# free loopback ports, and stopped again; RabbitMQ and NATS are the machine's own. promtool (for
# deploy/monitoring) comes from Debian's prometheus package, and headless Chromium (for
# tests/status_page.rs) from Debian's chromium package, each installed if missing.
EMULATORS := scripts/emulator.sh
test:
	@mkdir -p build
	$(CARGO) build --workspace --bins
	scripts/kafka-broker.sh start
	scripts/chromium.sh install
	scripts/prometheus.sh install
	$(EMULATORS) all start
	set -o pipefail; trap 'scripts/kafka-broker.sh stop; $(EMULATORS) all stop' EXIT; \
	  MILLRACE_TEST_KAFKA=$$(scripts/kafka-broker.sh addr) \
	  MILLRACE_TEST_MOTO=$$($(EMULATORS) moto addr) \
	  MILLRACE_TEST_PUBSUB=$$($(EMULATORS) pubsub addr) \
	  MILLRACE_TEST_GCS=$$($(EMULATORS) gcs addr) \
	  $(CARGO) test --workspace --no-fail-fast 2>&1 | tee build/test.log
	@awk '/^test result:/ {p += $$4; f += $$6} END {printf "all tests: %d passed, %d failed\n", p, f}' build/test.log

# One end-to-end run as separate processes: make e2e BUS=amqp|nats|kafka|sns-sqs|pubsub
# (sns-sqs keeps its stores on S3 on moto; pubsub on local files, see tests/cloud_stores.rs).
BUS ?= amqp
e2e:
	@mkdir -p build
	$(CARGO) build --workspace --bins
	@case "$(BUS)" in amqp|nats|kafka|sns-sqs|pubsub) ;; \
	  *) echo "make e2e: BUS must be one of amqp, nats, kafka, sns-sqs, pubsub (got $(BUS))" >&2; exit 2 ;; esac
	@case "$(BUS)" in kafka) scripts/kafka-broker.sh start ;; sns-sqs) $(EMULATORS) moto start ;; \
	  pubsub) $(EMULATORS) pubsub start ;; esac
	set -o pipefail; trap 'case "$(BUS)" in kafka) scripts/kafka-broker.sh stop ;; sns-sqs) $(EMULATORS) moto stop ;; \
	    pubsub) $(EMULATORS) pubsub stop ;; esac' EXIT; \
	  MILLRACE_TEST_KAFKA=$$(if [ "$(BUS)" = kafka ]; then scripts/kafka-broker.sh addr; fi) \
	  MILLRACE_TEST_MOTO=$$(if [ "$(BUS)" = sns-sqs ]; then $(EMULATORS) moto addr; fi) \
	  MILLRACE_TEST_PUBSUB=$$(if [ "$(BUS)" = pubsub ]; then $(EMULATORS) pubsub addr; fi) \
	  $(CARGO) test --test e2e_processes -- --exact e2e_$(subst -,_,$(BUS)) --nocapture

demo:
	$(CARGO) run --bin millrace -- demo

# Benchmarks (not tests): the fleet beside the bare prio + HPKE rate; a workflow-manager pass over
# settled history (flat in its size); the aggregate-worker's peak memory for windows of 100k and
# 1M Sum reports; the ingestor's reports/s (single and bulk uploads) beside one core's shard + seal
# rate, and its memory under overload; then each bus's worker loop beside the plainest loop its
# client crate allows.
bench:
	@mkdir -p build
	$(CARGO) build --release --workspace --bin millrace --bin ingestor
	target/release/millrace bench vdaf
	target/release/millrace bench scan
	target/release/millrace bench aggregate --reports 100000
	target/release/millrace bench aggregate --reports 1000000
	target/release/millrace bench ingest
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

# Containers (need Docker with Compose v2 and BuildKit; see deploy/README.md).
# The whole fleet on one broker: make up PROFILE=rabbitmq|nats|kafka|aws|pubsub
PROFILE ?= rabbitmq
up:
	docker compose --profile $(PROFILE) up --build

# One image per binary, from deploy/Dockerfile: millrace/<service>:dev
IMAGE_TAG ?= dev
IMAGES := ingestor workflow-manager intake-worker aggregate-worker mill cleaner millrace
images:
	set -e; for target in $(IMAGES); do \
	  docker build -f deploy/Dockerfile --target $$target -t millrace/$$target:$(IMAGE_TAG) .; \
	done
