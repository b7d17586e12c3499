#!/usr/bin/env bash
# The default test suite (what CI runs). Slow tests: .venv/bin/pytest -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Two workers (pytest-xdist), one per core of the CI machine: each test runs torch on one thread (tests/conftest.py),
# so one process left a core idle most of the time (515 s alone against 298 s with two workers, 2026-12-07).
exec .venv/bin/python -m pytest -q -n 2 "$@"
