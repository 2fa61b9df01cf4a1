# Sourced by the scripts in scripts/: messages, the Python venv in build/, loopback ports and the
# pinned moto install. The sourcing script sets SCRIPT_NAME (its name in messages), ROOT, BUILD and
# VENV first.

say() { echo "$SCRIPT_NAME: $*" >&2; }
die() {
    say "error: $*"
    exit 1
}

ensure_venv() {
    if [[ ! -x "$VENV/bin/python" ]]; then
        say "creating the python venv $VENV"
        mkdir -p "$BUILD"
        python3 -m venv "$VENV" >&2 || die "python3 -m venv $VENV failed"
    fi
}

pip_install() {
    ensure_venv
    say "installing $* into $VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "$@" >&2 ||
        die "pip install $* failed"
}

# Whether something accepts connections on 127.0.0.1:PORT.
port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# A port free on 127.0.0.1 right now.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# Prints the pid in PID_FILE if that process runs.
pid_in() {
    [[ -f "$1" ]] || return 1
    local pid
    pid="$(cat "$1")"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
    echo "$pid"
}

# The moto release scripts/moto_server.py's SQS patches were written against (it refuses to start
# on a release whose internals moved).
MOTO_VERSION=5.2.5

moto_installed() {
    [[ -x "$VENV/bin/python" ]] &&
        [[ "$("$VENV/bin/python" -c 'import moto; print(moto.__version__)' 2>/dev/null)" == "$MOTO_VERSION" ]]
}

# Prints, one per line, the command that runs moto_server through scripts/moto_server.py (SQS calls
# kept cheap on long queues), installing moto first if needed. Arguments for moto_server follow.
moto_command() {
    moto_installed || pip_install "moto[server]==$MOTO_VERSION"
    moto_installed || die "moto $MOTO_VERSION missing from $VENV after installing it"
    echo "$VENV/bin/python"
    echo "$ROOT/scripts/moto_server.py"
}
