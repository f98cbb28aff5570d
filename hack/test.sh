#!/usr/bin/env bash
# The whole test suite on a fresh or warm machine: venv, cached control-plane build, then pytest.
# Under CI (CI=true) a skipped test fails the run: CI is green only when every test ran.
# `--fast` (make test-fast): only the tests marked unit (no control plane, S3 server or torchrun), so
# no control-plane build either. With no arguments, the whole suite: the unit tests spread over the
# cores, then the integration tests in one process. Other arguments go to pytest as one run.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$repo"
start=$SECONDS
ensure_venv
echo "setup: venv ready in $((SECONDS - start)) s" >&2
results="$(mktemp -d)"
trap 'rm -rf "$results"' EXIT
rc=0
# One pytest run, its JUnit report kept for the skip check; the first failure's status is the script's.
# Args: a name for the report, then pytest's arguments.
phase() {
  local name="$1" code
  shift
  set +e
  "$venv/bin/python" -m pytest --junitxml="$results/$name.xml" "$@"
  code=$?
  set -e
  if [ "$code" -eq 5 ]; then
    echo "test: $name: pytest collected no tests; that is a failure" >&2
    code=1
  fi
  [ "$rc" -ne 0 ] || rc=$code
}
# The unit tests (no control plane, S3 server or torchrun) run one pytest-xdist worker per core, each
# torch on one thread: they are many small CPU-bound tests. Their bytecode is cached outside the clone:
# machines that set PYTHONDONTWRITEBYTECODE keep clones clean, and without a cache every worker
# recompiles the project and the tests (collection 19 s, 11 s cached). The integration tests share
# session-wide real parts (one control plane, one S3 server), so they run in one process, without the
# cache (with it, two full runs failed integration tests that had always passed; not understood).
unit_phase() {
  OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONDONTWRITEBYTECODE= \
    PYTHONPYCACHEPREFIX="${PYTHONPYCACHEPREFIX:-$DHAD_CACHE/pycache}" \
    phase unit -m unit -n auto --dist worksteal "$@"
}
if [ "${1:-}" = "--fast" ]; then
  shift
  unit_phase "$@"
else
  bin="$(bash hack/build-control-plane.sh)"
  echo "setup: control plane in $bin ($((SECONDS - start)) s)" >&2
  if [ $# -eq 0 ]; then  # the whole suite: the unit tests spread over the cores, then the rest
    unit_phase
    echo "test: unit tests done at $((SECONDS - start)) s from the start of setup" >&2
    phase integration -m integration
  else  # a selection of the caller's: one run, as given
    phase selection "$@"
  fi
fi
echo "test: pytest took $((SECONDS - start)) s from the start of setup" >&2
case "${CI:-}" in
  1|true|TRUE|True|yes)
    for report in "$results"/*.xml; do
      if ! "$venv/bin/python" "$repo/hack/no_skips.py" "$report"; then
        [ "$rc" -ne 0 ] || rc=1
      fi
    done
    ;;
esac
exit "$rc"
