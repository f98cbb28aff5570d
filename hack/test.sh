#!/usr/bin/env bash
# The whole test suite on a fresh or warm machine: venv, cached control-plane build, then pytest.
# Under CI (CI=true) a skipped test fails the run: CI is green only when every test ran.
# `--fast` (make test-fast): only the tests marked unit (no control plane, S3 server or torchrun), so
# no control-plane build either, spread over the cores. Other arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$repo"
start=$SECONDS
ensure_venv
echo "setup: venv ready in $((SECONDS - start)) s" >&2
selection=()
if [ "${1:-}" = "--fast" ]; then
  shift
  # one worker per core (pytest-xdist), each on one thread: the unit tests are many small CPU-bound ones
  selection=(-m unit -n auto --dist worksteal)
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
  bin="$(bash hack/build-control-plane.sh)"
  echo "setup: control plane in $bin ($((SECONDS - start)) s)" >&2
fi
results="$(mktemp -d)"
trap 'rm -rf "$results"' EXIT
set +e
"$venv/bin/python" -m pytest --junitxml="$results/junit.xml" ${selection[@]+"${selection[@]}"} "$@"
rc=$?
set -e
echo "test: pytest took $((SECONDS - start)) s from the start of setup" >&2
if [ "$rc" -eq 5 ]; then
  echo "test: pytest collected no tests; that is a failure" >&2
  exit 1
fi
case "${CI:-}" in
  1|true|TRUE|True|yes)
    if ! "$venv/bin/python" "$repo/hack/no_skips.py" "$results/junit.xml"; then
      [ "$rc" -ne 0 ] || rc=1
    fi
    ;;
esac
exit "$rc"
