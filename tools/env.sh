#!/usr/bin/env bash
# Set up everything recon needs, then run a command inside that environment.
#
#   tools/env.sh dvc repro      # the embedded demo pipeline
#   tools/env.sh pytest         # the test suite
#
# - Debian EGL/Mesa packages for offscreen rendering are installed when missing (needs root;
#   otherwise we stop and name them).
# - The virtual environment lives outside the clone, keyed by the lock file's hash, in
#   ${RECON_VENV_CACHE:-~/.cache/recon}/venv-<hash>, so a repeat run installs nothing.
# - Nothing here reaches a model or data hub; pip uses the package registry only.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOCK="$ROOT/requirements.lock"
PYTHON=${RECON_PYTHON:-$(command -v python3.11 || command -v python3)}
CACHE=${RECON_VENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/recon}
HASH=$( { cat "$LOCK"; "$PYTHON" -c 'import sys, platform; print(sys.version, platform.machine())'; } | sha256sum | cut -c1-16)
VENV="$CACHE/venv-$HASH"
EGL_PACKAGES=(libegl1 libegl-mesa0 libgl1-mesa-dri libgbm1 libgl1 libglx-mesa0)

say() { printf '\033[1m[recon env]\033[0m %s\n' "$*" >&2; }

ensure_system_packages() {
    local missing=()
    for lib in libEGL.so.1 libEGL_mesa.so.0 libgbm.so.1 libGL.so.1; do
        ldconfig -p 2>/dev/null | grep -q "$lib" || missing+=("$lib")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if ! command -v apt-get >/dev/null; then
        say "offscreen rendering needs EGL/Mesa (missing: ${missing[*]}); install your system's equivalent of: ${EGL_PACKAGES[*]}"
        exit 1
    fi
    if [ "$(id -u)" -ne 0 ]; then
        say "offscreen rendering needs these Debian packages (missing: ${missing[*]}). Run as root:"
        say "  apt-get update && apt-get install -y ${EGL_PACKAGES[*]}"
        exit 1
    fi
    say "installing EGL/Mesa packages: ${EGL_PACKAGES[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${EGL_PACKAGES[@]}" >/dev/null
}

ensure_venv() {
    if [ ! -f "$VENV/.complete" ]; then
        say "creating $VENV from requirements.lock (first run only; torch is large)"
        rm -rf "$VENV"
        mkdir -p "$CACHE"
        "$PYTHON" -m venv "$VENV"
        "$VENV/bin/python" -m pip install -q --upgrade pip
        "$VENV/bin/python" -m pip install -q --no-deps -r "$LOCK"
        "$VENV/bin/python" -m pip check >&2 || say "pip check reported the above (continuing)"
        touch "$VENV/.complete"
    fi
    # The venv is shared between clones: point its editable install at this clone.
    local installed
    installed=$(cd / && "$VENV/bin/python" -c 'import pathlib, cli; print(pathlib.Path(cli.__file__).resolve().parent)' 2>/dev/null || true)
    if [ "$installed" != "$ROOT" ] || [ ! -x "$VENV/bin/recon" ]; then
        say "installing this clone ($ROOT) into the environment (editable)"
        # PYTHONWARNINGS: setuptools' "Editable installation" notice is not for our users
        PYTHONWARNINGS=ignore "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" >&2
    fi
}

ensure_system_packages
ensure_venv

export PATH="$VENV/bin:$PATH" VIRTUAL_ENV="$VENV"
# This clone first on the import path, even if another clone sharing the venv re-pointed it.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYOPENGL_PLATFORM=${PYOPENGL_PLATFORM:-egl}
export DVC_NO_ANALYTICS=1
cd "$ROOT"
if [ $# -eq 0 ]; then
    say "environment ready: $VENV"
    exit 0
fi
exec "$@"
