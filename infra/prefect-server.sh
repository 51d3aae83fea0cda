#!/usr/bin/env bash
# A Prefect server for scheduled retraining and for several machines, in the foreground until Ctrl-C.
#   bash infra/prefect-server.sh [--home ~/.dml/prefect] [--host 0.0.0.0] [--port 4200]
# Then, in every shell and node that runs flows: export PREFECT_API_URL=http://<host>:<port>/api
# (`dml serve` starts one by itself when PREFECT_API_URL is not set.)
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m tasks.prefect_server "$@"
