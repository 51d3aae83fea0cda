#!/usr/bin/env bash
# Set-up shared by scripts/test.sh and scripts/demo.sh on a fresh Debian machine: the Debian packages
# (Fashion-MNIST, the fonts of the font-glyph dataset's variants), a virtual environment in $VENV (default .venv) and
# the project with its constraints. Source it: `source scripts/setup.sh [pip extras]` (default cpu).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

APT_PACKAGES=(dataset-fashion-mnist fonts-dejavu-core fonts-dejavu-extra fonts-freefont-ttf fonts-liberation fonts-liberation2 fonts-croscore
  # the font-glyph dataset's "many" variant, dml_core/data/sources/font_glyph_variants.py: 88 MB download, 227 MB installed
  fonts-noto-core fonts-noto-mono fonts-urw-base35 fonts-texgyre fonts-cmu fonts-sil-gentiumplus
  fonts-sil-charis fonts-sil-doulos fonts-sil-andika fonts-open-sans fonts-linuxlibertine fonts-paratype
  fonts-ebgaramond fonts-crosextra-carlito fonts-crosextra-caladea fonts-roboto-unhinted fonts-stix
  fonts-firacode fonts-hack fonts-jetbrains-mono fonts-go fonts-oldstandard fonts-inter fonts-lato
  fonts-junicode fonts-cardo fonts-vollkorn fonts-mph-2b-damase fonts-tuffy fonts-anonymous-pro fonts-clear-sans
  fonts-b612 fonts-uralic fonts-gfs-didot fonts-gfs-artemisia fonts-gfs-neohellenic fonts-yrsa-rasa
  fonts-comic-neue fonts-courier-prime fonts-jura fonts-play fonts-mononoki fonts-league-mono fonts-karla
  fonts-cabin fonts-averia-gwf fonts-adf-accanthis fonts-opendyslexic)
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
