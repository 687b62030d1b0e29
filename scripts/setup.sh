#!/usr/bin/env bash
# Set up a development environment in .venv: safehub, its test tools, and bubblewrap when we can.
# Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# Ask for the CPU build first: a plain "torch" requirement would pull a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test,lint]'

# bubblewrap gives the worker its namespaces; safehub degrades loudly without it.
if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq bubblewrap) >/dev/null 2>&1 \
      || echo "setup: could not install bubblewrap; the sandbox will use its other layers" >&2
  else
    echo "setup: bubblewrap is not installed (sudo apt-get install bubblewrap); the sandbox will use its other layers" >&2
  fi
fi
echo "setup: done. Activate with: source .venv/bin/activate"
