# Sourced by scripts/emulator.sh and scripts/kafka-broker.sh: a service that test processes
# start for themselves and that stops once the last of them has exited.
#
# `start` with a STOP_WITH_PID variable set (EMULATOR_STOP_WITH_PID, KAFKA_STOP_WITH_PID) records
# that pid in NAME.owners and leaves a watcher behind. A later `start` that finds the service
# running adds its own pid, so a test binary that starts right after another one exited never gets
# a service that is about to be stopped. A `start` without the variable (make test, a person)
# makes the running service permanent: it removes the owners file and the watcher leaves it alone
# (`stop` still stops it). Starting, adopting and the watcher's decision to stop all hold
# NAME.lock (flock on fd 9), so they never interleave; children are started with fd 9 closed.

# owned_lock LOCK_FILE: takes the lock on fd 9; it is released when the script exits or the next
# owned_lock replaces fd 9.
owned_lock() {
    exec 9>"$1"
    flock 9
}

# owned_adopt OWNERS_FILE OWNER_PID: called for a running service.
owned_adopt() {
    local owners="$1" owner="$2"
    if [[ -z "$owner" ]]; then
        rm -f "$owners"
    elif [[ -f "$owners" ]]; then
        echo "$owner" >>"$owners"
    fi
}

# owned_started OWNERS_FILE OWNER_PID SERVICE_PID PID_FILE ADDR_FILE LOCK_FILE GROUP: called right
# after starting a service. Without an owner the service is permanent. With one, a detached
# watcher stops it (its process group when GROUP is 1) once no owner is alive, and only while the
# pid file still names it (so a later service is never touched).
owned_started() {
    local owners="$1" owner="$2" pid="$3" pid_file="$4" addr_file="$5" lock="$6" group="$7"
    if [[ -z "$owner" ]]; then
        rm -f "$owners"
        return
    fi
    echo "$owner" >"$owners"
    # shellcheck disable=SC2016 # expanded by the watcher's shell
    setsid bash -c '
        owners=$1 pid=$2 pid_file=$3 addr_file=$4 lock=$5 group=$6
        while sleep 1; do
            exec 9>"$lock"
            flock 9
            [[ "$(cat "$pid_file" 2>/dev/null)" == "$pid" ]] || exit 0
            kill -0 "$pid" 2>/dev/null || exit 0
            [[ -f "$owners" ]] || exit 0
            while read -r owner; do
                if [[ -n "$owner" ]] && kill -0 "$owner" 2>/dev/null; then
                    exec 9>&-
                    continue 2
                fi
            done <"$owners"
            if [[ "$group" == 1 ]]; then
                kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
            else
                kill "$pid" 2>/dev/null || true
            fi
            rm -f "$pid_file" "$addr_file" "$owners"
            exit 0
        done
    ' watcher "$owners" "$pid" "$pid_file" "$addr_file" "$lock" "$group" \
        </dev/null >/dev/null 2>&1 9>&- &
}
