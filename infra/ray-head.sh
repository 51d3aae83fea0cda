#!/usr/bin/env bash
# A Ray head node in the foreground, until Ctrl-C or SIGTERM (that stops exactly this node; never `ray stop`).
#   bash infra/ray-head.sh [--port=6379] [more `ray start` options, e.g. --num-cpus=4 --node-ip-address=IP]
# Options given here win over the defaults below (the last value of an option counts).
# Runs join it with `ray.address: <head-ip>:<port>` in the run config (or --set ray.address=...).
set -euo pipefail
source "$(dirname "$0")/ray-env.sh"
exec "$RAY_BIN" start --head --block --disable-usage-stats --port=6379 --include-dashboard=false "$@"
