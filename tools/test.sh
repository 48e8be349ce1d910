#!/usr/bin/env bash
# The test suite, from nothing: makes .venv on first use, then lint (ruff), type check (mypy) and pytest, which ends
# with the 15 slowest tests (docs/testing.md: what the suite costs and how a new test stays cheap). Extra arguments
# go to pytest (e.g. `-m "not multiprocess"` for the single-process tests only). Exits non-zero on any failure, and
# on "no tests ran" (pytest's exit code 5).
set -euo pipefail
source "$(dirname "$0")/bootstrap.sh"
cd "$root"
ruff check gatedpo_mega tests tools
ruff format --check gatedpo_mega tests tools
mypy
python -m pytest --durations=15 "$@"
