#!/usr/bin/env bash
# Installs promtool and Prometheus, and starts and stops a local Prometheus, for checking
# deploy/monitoring (tests/monitoring.rs) and for looking at a local fleet's metrics.
#
#   scripts/prometheus.sh install        # install Debian's `prometheus` and `prometheus-pushgateway` if
#                                        # promtool, prometheus or the Pushgateway (tests/pushgateway.rs) is missing
#   scripts/prometheus.sh start CONFIG   # start Prometheus with prometheus.yml CONFIG, print its address
#   scripts/prometheus.sh addr           # print the running Prometheus's address (http://127.0.0.1:PORT)
#   scripts/prometheus.sh stop           # stop the Prometheus started by `start`
#   scripts/prometheus.sh status         # say whether it runs
#
# Install: Debian's `prometheus` package (which carries promtool), with apt-get as root (or through
# sudo), without recommends. The package ships a systemd unit; the install keeps it from starting
# (a policy-rc.d that refuses, for the length of the install, where none is in place) and stops
# and disables it if it runs anyway, so only `start` runs a Prometheus. Nothing happens when both
# commands are already on PATH (PROMTOOL / PROMETHEUS may name them instead).
#
# `start` listens on 127.0.0.1 only, on PROMETHEUS_PORT if set, else on a free port, with its data
# in build/prometheus/data (wiped at each start). Its pid goes to build/prometheus/prometheus.pid,
# its address to build/prometheus/prometheus.addr, its output to build/prometheus/prometheus.log.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="$ROOT/build"
VENV="$BUILD/venv"
STATE="$BUILD/prometheus"
PID_FILE="$STATE/prometheus.pid"
ADDR_FILE="$STATE/prometheus.addr"
LOG_FILE="$STATE/prometheus.log"
SCRIPT_NAME=prometheus
# shellcheck source=lib/common.sh
source "$ROOT/scripts/lib/common.sh"

PROMTOOL="${PROMTOOL:-promtool}"
PROMETHEUS="${PROMETHEUS:-prometheus}"
PUSHGATEWAY="${PUSHGATEWAY:-prometheus-pushgateway}"

installed() {
    command -v "$PROMTOOL" >/dev/null && command -v "$PROMETHEUS" >/dev/null &&
        command -v "$PUSHGATEWAY" >/dev/null
}

as_root() {
    if [[ "$(id -u)" == 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        die "promtool and prometheus are missing and installing them needs root: run \
'apt-get install prometheus' as root (or install Prometheus's release tarball and put promtool and \
prometheus on PATH)"
    fi
}

cmd_install() {
    if installed; then
        return
    fi
    command -v apt-get >/dev/null ||
        die "promtool or prometheus is missing and there is no apt-get: install Prometheus (its \
release tarball carries both) and put promtool and prometheus on PATH"
    say "installing Debian's prometheus package (promtool and prometheus)"
    local policy=/usr/sbin/policy-rc.d made_policy=""
    if [[ ! -e "$policy" ]]; then
        # Exit status 101: "action forbidden", so the package's service does not start.
        as_root sh -c "printf '#!/bin/sh\nexit 101\n' >$policy && chmod 755 $policy"
        made_policy=1
    fi
    local status=0
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        prometheus prometheus-pushgateway >&2 || status=$?
    if [[ -n "$made_policy" ]]; then
        as_root rm -f "$policy"
    fi
    ((status == 0)) || die "apt-get install prometheus failed (status $status); try apt-get update first"
    # Belt and braces: the packaged service must not keep running (or start at boot).
    if command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
        as_root systemctl disable --now prometheus prometheus-pushgateway >/dev/null 2>&1 || true
    elif command -v service >/dev/null; then
        as_root service prometheus stop >/dev/null 2>&1 || true
        as_root service prometheus-pushgateway stop >/dev/null 2>&1 || true
    fi
    installed || die "promtool, prometheus or prometheus-pushgateway still missing after installing \
Debian's prometheus and prometheus-pushgateway packages"
    say "installed $("$PROMTOOL" --version 2>&1 | head -n 1)"
}

cmd_start() {
    local config="${1:-}"
    [[ -n "$config" ]] || die "usage: $0 start CONFIG (a prometheus.yml)"
    [[ -f "$config" ]] || die "no config file $config"
    config="$(cd "$(dirname "$config")" && pwd)/$(basename "$config")"
    cmd_install
    mkdir -p "$STATE"
    local pid
    if pid="$(pid_in "$PID_FILE")"; then
        say "already running (pid $pid) at $(cat "$ADDR_FILE"); stop it first to change its config"
        cat "$ADDR_FILE"
        return
    fi
    "$PROMTOOL" check config "$config" >&2 || die "promtool check config $config failed"
    local port="${PROMETHEUS_PORT:-$(free_port)}"
    rm -rf "$STATE/data"
    say "starting prometheus on 127.0.0.1:$port with $config (log: $LOG_FILE)"
    setsid "$PROMETHEUS" --config.file="$config" --storage.tsdb.path="$STATE/data" \
        --web.listen-address="127.0.0.1:$port" --web.enable-lifecycle \
        </dev/null >"$LOG_FILE" 2>&1 9>&- &
    pid=$!
    echo "$pid" >"$PID_FILE"
    local addr="http://127.0.0.1:$port" waited=0
    echo "$addr" >"$ADDR_FILE"
    until curl -fsS "$addr/-/ready" >/dev/null 2>&1; do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$PID_FILE" "$ADDR_FILE"
            tail -n 20 "$LOG_FILE" >&2 || true
            die "prometheus exited before it was ready (see $LOG_FILE)"
        fi
        if ((waited >= 300)); then # 30 s
            kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
            rm -f "$PID_FILE" "$ADDR_FILE"
            die "prometheus was not ready on 127.0.0.1:$port within 30 s (see $LOG_FILE)"
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    say "ready: pid $pid, $addr"
    echo "$addr"
}

cmd_stop() {
    local pid
    if ! pid="$(pid_in "$PID_FILE")"; then
        rm -f "$PID_FILE" "$ADDR_FILE"
        say "not running"
        return
    fi
    kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
    local waited=0
    while kill -0 "$pid" 2>/dev/null; do
        if ((waited >= 100)); then # 10 s
            say "pid $pid did not stop on TERM; sending KILL"
            kill -9 -- "-$pid" 2>/dev/null || kill -9 "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    rm -f "$PID_FILE" "$ADDR_FILE"
    say "stopped (pid $pid)"
}

cmd_addr() {
    pid_in "$PID_FILE" >/dev/null || die "prometheus is not running (start it with: $0 start CONFIG)"
    cat "$ADDR_FILE"
}

cmd_status() {
    local pid
    if pid="$(pid_in "$PID_FILE")"; then
        say "running (pid $pid) at $(cat "$ADDR_FILE")"
    else
        say "not running"
        return 1
    fi
}

usage() {
    echo "usage: $0 {install|start CONFIG|stop|addr|status}" >&2
    exit 2
}

[[ $# -ge 1 ]] || usage
case "$1" in
install) cmd_install ;;
start) cmd_start "${2:-}" ;;
stop) cmd_stop ;;
addr) cmd_addr ;;
status) cmd_status ;;
*) usage ;;
esac
