#!/usr/bin/env bash
# The whole test suite on a fresh or warm machine: venv, cached control-plane build, then pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$repo"
start=$SECONDS
ensure_venv
echo "setup: venv ready in $((SECONDS - start)) s" >&2
bin="$(bash hack/build-control-plane.sh)"
echo "setup: control plane in $bin ($((SECONDS - start)) s)" >&2
set +e
"$venv/bin/python" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "test: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$rc"
