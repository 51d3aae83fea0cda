#!/usr/bin/env bash
# The project's test command: sets up everything on a fresh Debian machine, then runs the whole suite.
#   bash scripts/test.sh            # all tests
#   bash scripts/test.sh -m 'not slow' tests/dml_core   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(dataset-fashion-mnist fonts-dejavu-core fonts-dejavu-extra fonts-freefont-ttf fonts-liberation fonts-liberation2 fonts-croscore)
missing=()
for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q -c constraints.txt -e ".[cpu,test]"

export RAY_USAGE_STATS_ENABLED=0 RAY_DISABLE_DOCKER_CPU_WARNING=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
exec "$VENV/bin/python" -m pytest -q -ra "$@"
