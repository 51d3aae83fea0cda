#!/usr/bin/env bash
# A Ray worker node joining the head at ADDRESS (host:port), in the foreground until Ctrl-C or SIGTERM.
#   bash infra/ray-worker.sh HEAD_HOST:PORT [more `ray start` options, e.g. --num-cpus=4 --num-gpus=1]
set -euo pipefail
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
  echo "usage: $0 HEAD_HOST:PORT [ray start options]" >&2
  exit 2
fi
source "$(dirname "$0")/ray-env.sh"
address="$1"; shift
exec "$RAY_BIN" start --block --disable-usage-stats --address="$address" "$@"
