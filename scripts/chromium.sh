#!/usr/bin/env bash
# Headless Chromium for the status page test (tests/status_page.rs renders `millrace status
# --serve` in a real browser and takes a screenshot of it).
#
#   scripts/chromium.sh install   # install Debian's `chromium` package if no chromium is found
#   scripts/chromium.sh path      # print the chromium binary's path (exit 1, saying so, if none)
#
# CHROMIUM may name the binary instead. Install: apt-get as root (or through sudo), without
# recommends; if the package lists are empty or stale, one `apt-get update` and a second try.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="$ROOT/build"
VENV="$BUILD/venv"
SCRIPT_NAME=chromium
# shellcheck source=lib/common.sh
source "$ROOT/scripts/lib/common.sh"

# The chromium binary, or nothing.
find_chromium() {
    local candidate
    for candidate in "${CHROMIUM:-}" chromium chromium-browser /usr/bin/chromium /usr/lib/chromium/chromium; do
        [[ -n "$candidate" ]] || continue
        if command -v "$candidate" >/dev/null 2>&1; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

as_root() {
    if [[ "$(id -u)" == 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        die "chromium is missing and installing it needs root: run 'apt-get install chromium' as \
root (or set CHROMIUM to a Chromium or Chrome binary)"
    fi
}

cmd_install() {
    if find_chromium >/dev/null; then
        return
    fi
    command -v apt-get >/dev/null ||
        die "chromium is missing and there is no apt-get: install Chromium (or Chrome) and set \
CHROMIUM to its binary"
    say "installing Debian's chromium package"
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        chromium >&2; then
        say "apt-get install chromium failed; updating the package lists and trying once more"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update >&2 ||
            die "apt-get update failed"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            chromium >&2 || die "apt-get install chromium failed"
    fi
    local path
    path="$(find_chromium)" || die "chromium still missing after installing the chromium package"
    say "installed $("$path" --version 2>/dev/null | head -n 1)"
}

cmd_path() {
    find_chromium ||
        die "no chromium found (run 'scripts/chromium.sh install', or set CHROMIUM to its binary)"
}

case "${1:-}" in
    install) cmd_install ;;
    path) cmd_path ;;
    *)
        echo "usage: $0 install|path" >&2
        exit 2
        ;;
esac
