#!/usr/bin/env bash
# Create .venv with napari-supn and its test dependencies (idempotent).
#
# Installs the CPU build of torch 2.13.0 first: the torch range in
# pyproject.toml would otherwise let pip pull a CUDA build of several GB.
# On a machine with a GPU, install your CUDA build of torch into .venv first;
# this script keeps any torch that already satisfies the range.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"

# Xvfb runs napari in the widget tests and the demo screenshot; napari cannot
# draw under QT_QPA_PLATFORM=offscreen. Needs root (as on CI); skipped if present.
if ! command -v Xvfb >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq
        apt-get install -y -qq xvfb libxcb-icccm4 libxcb-keysyms1 libgl1 libegl1 \
            libxkbcommon-x11-0 libxcb-xinerama0 libxcb-image0 libxcb-render-util0 \
            libxcb-shape0 libxcb-randr0 libxcb-xkb1 libdbus-1-3 libfontconfig1 >/dev/null
    else
        echo "warning: Xvfb is missing; install the Debian packages xvfb libxcb-icccm4 libxcb-keysyms1" >&2
    fi
fi

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[testing]"
