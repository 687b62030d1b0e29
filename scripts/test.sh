#!/usr/bin/env bash
# The whole test suite, as CI runs it; arguments go to pytest.
# As root it runs twice: as root, then as an unprivileged user (scripts/test-as-user.sh), since
# the sandbox takes different paths for each and root passes permission checks a user fails.
# SAFEHUB_TEST_AS_USER=0 skips the second run. Both runs always happen; either failing fails this.
set -euo pipefail
cd "$(dirname "$0")/.."

failed=0
summary=()
run() {  # run LABEL COMMAND...
  echo "===== safehub tests: $1 ====="
  local label=$1 start=$SECONDS rc=0
  shift
  "$@" || rc=$?
  local result="passed"
  if ((rc != 0)); then result="FAILED (exit $rc)"; failed=1; fi
  summary+=("$label: $result in $((SECONDS - start))s")
}

if [[ $# == 0 ]]; then  # a whole run also checks names and types; a run of chosen tests does not
  run "lint (ruff, mypy)" bash scripts/lint.sh
fi
run "as $(id -un) (uid $(id -u))" .venv/bin/python -m pytest "$@"

if [[ $(id -u) == 0 && ${SAFEHUB_TEST_AS_USER:-1} != 0 ]]; then
  missing=""
  for tool in git runuser useradd tar "${SAFEHUB_TEST_USER_PYTHON:-/usr/bin/python3.11}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=" $tool"
  done
  if [[ -z $missing ]]; then
    run "as unprivileged user ${SAFEHUB_TEST_USER:-safehub-ci}" bash scripts/test-as-user.sh "$@"
  else
    summary+=("as unprivileged user: SKIPPED, missing:$missing")
  fi
fi

echo "===== safehub tests: summary ====="
printf '  %s\n' "${summary[@]}"
exit "$failed"
