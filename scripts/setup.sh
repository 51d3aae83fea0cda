#!/usr/bin/env bash
# Set-up shared by scripts/test.sh and scripts/demo.sh on a fresh Debian machine: the Debian packages
# (Fashion-MNIST, the fonts of the font-glyph dataset), a virtual environment in $VENV (default .venv) and
# the project with its constraints. Source it: `source scripts/setup.sh [pip extras]` (default cpu).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

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
"$VENV/bin/pip" install -q -c constraints.txt -e ".[${1:-cpu}]"

export RAY_USAGE_STATS_ENABLED=0 RAY_DISABLE_DOCKER_CPU_WARNING=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
