#!/usr/bin/env bash
# Copies the generated CRDs (crds/*.yaml, from `python -m dhad_api.crd`) into the Helm chart's crds/
# folder, which Helm installs before the templates. Run after regenerating crds/; a unit test
# (tests/unit/test_chart_files.py) fails while the two folders differ.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$repo/charts/dhad/crds"
mkdir -p "$dest"
rm -f "$dest"/*.yaml
cp "$repo"/crds/*.yaml "$dest"/
ls "$dest"
