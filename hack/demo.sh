#!/usr/bin/env bash
# The demo: installs what it needs, then runs the Dhad recipe on tiny models on this machine.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$repo"
ensure_venv
exec "$venv/bin/dhad" demo "$@"
