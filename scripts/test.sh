#!/usr/bin/env bash
# The project's test command: sets up everything on a fresh Debian machine, then runs the whole suite.
#   bash scripts/test.sh            # all tests
#   bash scripts/test.sh -m 'not slow' tests/dml_core   # extra arguments go to pytest
set -euo pipefail
source "$(dirname "$0")/setup.sh" cpu,test
exec "$VENV/bin/python" -m pytest -q -ra "$@"
