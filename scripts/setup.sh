#!/usr/bin/env bash
# Set up a development environment in .venv: safehub, its test tools, and bubblewrap when we can.
# Safe to run again; it only installs what is missing. Says each step as it starts (a fresh machine
# takes a few minutes, most of it torch); on a terminal pip shows its own progress too.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { echo "setup: $*"; }

PYTHON=${PYTHON:-python3}
PIP_QUIET=(--quiet)
if [ -t 1 ]; then PIP_QUIET=(); fi  # pip's own lines and progress bars where someone watches

if [ ! -x .venv/bin/python ]; then
  step "making the virtual environment .venv with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv .venv
else
  step "using the virtual environment .venv"
fi
# Ask for the CPU build first: a plain "torch" requirement would pull a multi-GB CUDA build.
step "installing torch 2.13.0, CPU build (the largest step: a few minutes on a fresh machine)"
.venv/bin/python -m pip install "${PIP_QUIET[@]}" --disable-pip-version-check "torch==2.13.0"
step "installing safehub (editable) with its test and lint tools"
.venv/bin/python -m pip install "${PIP_QUIET[@]}" --disable-pip-version-check -e '.[test,lint]'

# bubblewrap gives the worker its namespaces; safehub degrades loudly without it.
if command -v bwrap >/dev/null 2>&1; then
  step "bubblewrap is installed ($(command -v bwrap))"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  step "installing bubblewrap with apt-get"
  (apt-get update -qq && apt-get install -y -qq bubblewrap) >/dev/null 2>&1 \
    || echo "setup: could not install bubblewrap; the sandbox will use its other layers" >&2
else
  echo "setup: bubblewrap is not installed (sudo apt-get install bubblewrap); the sandbox will use its other layers" >&2
fi
step "done. Activate with: source .venv/bin/activate"
