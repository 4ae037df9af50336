#!/usr/bin/env bash
# The README's test command: set up everything the tests need on a fresh machine (the project
# with its test extra, Debian packages, third-party servers in their own virtual environments),
# then lint, type-check and run the test suite. Idempotent: what is already there is kept.
#
#   scripts/test.sh                 # the default run (what CI runs)
#   scripts/test.sh --extended      # also the long runs (fuzzing, big fits); see tests/conftest.py
#   scripts/test.sh tests/test_x.py # pytest arguments are passed through
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-test-env.sh
export REPROGRAM_REQUIRE_ALL=1  # a test whose third-party part is missing fails instead of skipping
ruff check .
mypy
python -m pytest -q "$@"
