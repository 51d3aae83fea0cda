#!/usr/bin/env bash
# The demo: sets up everything on a fresh Debian machine, then runs the three-run story of configs/demo.yaml
# (about 3 minutes on 2 cores after the set-up). Extra arguments go to `dml run`, e.g. --set run.root=/tmp/demo
set -euo pipefail
source "$(dirname "$0")/setup.sh" cpu
exec "$VENV/bin/dml" run configs/demo.yaml "$@"
