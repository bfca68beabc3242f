#!/usr/bin/env bash
# Runs the test suite from a fresh machine: sets up .venv (torch, the build), then pytest.
# Extra arguments go to pytest.
source "$(dirname "$0")/setup_env.sh"
"$PY" -m pytest tests -q "$@"
