#!/usr/bin/env bash
# Names and types: ruff (pyflakes and bugbear) over everything, mypy over safehub/ and worker/.
# Settings live in pyproject.toml; scripts/test.sh runs this before the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check --quiet safehub worker tests benchmarks examples
.venv/bin/mypy
echo "lint: ruff and mypy found nothing"
