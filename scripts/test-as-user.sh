#!/usr/bin/env bash
# Run the test suite as an unprivileged user; root only (scripts/test.sh calls it).
# Root hides bugs a user's run trips on: it reads 0600 files, is exempt from RLIMIT_NPROC and
# makes the worker take the uid-drop path. That user cannot read root's tree or pyenv's Python
# (/root is 0700), so it gets a copy of the tree under its home and a venv made from the system
# Python. The venv is kept and reinstalled only when the dependencies change.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
USER_NAME=${SAFEHUB_TEST_USER:-safehub-ci}
PYTHON=${SAFEHUB_TEST_USER_PYTHON:-/usr/bin/python3.11}  # 3.11: the CPU torch wheel on disk is cp311

id -u "$USER_NAME" >/dev/null 2>&1 || useradd --create-home --shell /usr/sbin/nologin "$USER_NAME"
HOME_DIR=$(getent passwd "$USER_NAME" | cut -d: -f6)
TREE=$HOME_DIR/safehub
VENV=$HOME_DIR/venv

# A clean environment: root's PATH and pyenv variables point into /root, which the user cannot read.
as_user() {
  runuser -u "$USER_NAME" -- env -u PYENV_ROOT -u VIRTUAL_ENV -u PYTHONPATH \
    HOME="$HOME_DIR" USER="$USER_NAME" LOGNAME="$USER_NAME" \
    PATH="$VENV/bin:/usr/local/bin:/usr/bin:/bin" "$@"
}

# A fresh copy each run, so it holds exactly the work tree's files: committed or not, minus the
# ignored ones (.venv, caches). Extracted by the user, so the user owns it and tests can write.
rm -rf "$TREE"
as_user mkdir "$TREE"
git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' f; do if [[ -e $f || -L $f ]]; then printf '%s\0' "$f"; fi; done \
  | tar --null -T - -cf - | as_user tar -C "$TREE" -xf -

# Debian keeps ensurepip (needed by venv) in a separate package.
if ! "$PYTHON" -c 'import ensurepip' 2>/dev/null; then
  apt-get update -qq && apt-get install -y -qq "python3.$("$PYTHON" -c 'import sys; print(sys.version_info[1])')-venv" >/dev/null
fi
# The editable install points at $TREE, whose path never changes, so a new copy needs no reinstall.
stamp=$(cat pyproject.toml scripts/test-as-user.sh | sha256sum | cut -d' ' -f1)
if [[ $(cat "$VENV/.safehub-stamp" 2>/dev/null) != "$stamp" ]]; then
  echo "test-as-user: installing into $VENV (reused until pyproject.toml or this script changes)"
  [[ -x $VENV/bin/python ]] || as_user "$PYTHON" -m venv "$VENV"
  # CPU torch first: a plain "torch" requirement would pull a multi-GB CUDA build.
  as_user "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
  as_user "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$TREE[test]"
  echo "$stamp" | as_user tee "$VENV/.safehub-stamp" >/dev/null
fi

# Paths given under the real tree (absolute ones) are rewritten into the copy.
echo "test-as-user: uid $(id -u "$USER_NAME") ($USER_NAME), tree $TREE, $("$VENV/bin/python" -V)"
as_user env -C "$TREE" "$VENV/bin/python" -m pytest "${@/#"$ROOT/"/"$TREE/"}"
