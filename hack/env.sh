# Sourced by hack/*.sh: caches outside the repo, keyed by version, and the project venv.
DHAD_CACHE="${DHAD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dhad}"
export DHAD_CACHE
export UV_CACHE_DIR="${UV_CACHE_DIR:-$DHAD_CACHE/uv}"
export HF_HOME="${HF_HOME:-$DHAD_CACHE/hf}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 TOKENIZERS_PARALLELISM=false
export PIP_DISABLE_PIP_VERSION_CHECK=1
UV_VERSION=0.13.8
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"
site_packages="$venv/lib/python3.11/site-packages"  # ensure_venv makes the venv with Python 3.11

# DeepSpeed compiles its ops (cpu_adam, fused_adam, shm comm) at first use, 1-2 min each on 2 cores:
# they are cached outside the clone, one folder per Python/torch/DeepSpeed version and venv. torch's JIT
# rebuilds an op whenever its source path changes, and each venv has its own copy of DeepSpeed's
# sources, so clones or worktrees sharing one folder rebuilt each other's ops on every run (seen: 113 s
# in one test's setup). Versions come from the venv's metadata (no Python start-up).
torch_extensions_dir() {
  local site="$site_packages" torch deepspeed where
  torch="$(cd "$site" 2>/dev/null && ls -d torch-*.dist-info 2>/dev/null | head -1)"
  deepspeed="$(cd "$site" 2>/dev/null && ls -d deepspeed-*.dist-info 2>/dev/null | head -1)"
  torch="${torch#torch-}"; deepspeed="${deepspeed#deepspeed-}"
  where="$(printf %s "$venv" | sha256sum | cut -c1-8)"
  echo "$DHAD_CACHE/torch-extensions/py311-torch${torch%.dist-info}-deepspeed${deepspeed%.dist-info}-venv$where"
}
if [ -z "${DHAD_USER_TORCH_EXTENSIONS_DIR+x}" ]; then
  DHAD_USER_TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-}"
fi
export TORCH_EXTENSIONS_DIR="${DHAD_USER_TORCH_EXTENSIONS_DIR:-$(torch_extensions_dir)}"

# uv installs no bytecode, and where PYTHONDONTWRITEBYTECODE is set (this kind of machine sets it)
# Python never writes any: every process then compiles what it imports from source, 13.4 s for
# torch + transformers + trl + deepspeed against 5.5 s with bytecode, in every torchrun launcher,
# worker, CLI and test process. So the venv's packages are compiled once per set of installed
# distributions (51 s on 2 cores; a stamp in the venv skips the check when nothing changed). Files
# that do not compile (a few Python 2 examples in packages) are left as they are: importing one
# would fail either way. The project's own sources are not compiled: clones stay clean.
compile_site_packages() {
  local site="$site_packages" stamp="$venv/.dhad-bytecode" installed
  installed="$(cd "$site" && ls -d -- *.dist-info | sha256sum | cut -c1-16)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$installed" ]; then
    echo "setup: compiling the venv's packages to bytecode (once per install)" >&2
    "$venv/bin/python" -m compileall -q -j 0 "$site" >/dev/null 2>&1 || true
    echo "$installed" >"$stamp"
  fi
}

# Installs uv (once, into the cache) and the project with every extra into .venv (seconds when warm).
ensure_venv() {
  local uv="$DHAD_CACHE/uv-$UV_VERSION/bin/uv"
  if [ ! -x "$uv" ]; then
    echo "setup: installing uv $UV_VERSION into $DHAD_CACHE" >&2
    python3 -m venv "$DHAD_CACHE/uv-$UV_VERSION"
    "$DHAD_CACHE/uv-$UV_VERSION/bin/pip" install -q "uv==$UV_VERSION"
  fi
  if [ ! -x "$venv/bin/python" ]; then
    "$uv" venv -q --python 3.11 "$venv"
  fi
  "$uv" pip install -q -p "$venv/bin/python" -e "$repo[operator,trainer,local,dev]"
  compile_site_packages
  export TORCH_EXTENSIONS_DIR="${DHAD_USER_TORCH_EXTENSIONS_DIR:-$(torch_extensions_dir)}"  # versions now known
}
