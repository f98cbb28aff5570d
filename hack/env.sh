# Sourced by hack/*.sh: caches outside the repo, keyed by version, and the project venv.
DHAD_CACHE="${DHAD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dhad}"
export DHAD_CACHE
export UV_CACHE_DIR="${UV_CACHE_DIR:-$DHAD_CACHE/uv}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$DHAD_CACHE/torch-extensions}"
export HF_HOME="${HF_HOME:-$DHAD_CACHE/hf}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 TOKENIZERS_PARALLELISM=false
export PIP_DISABLE_PIP_VERSION_CHECK=1
UV_VERSION=0.13.8
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"

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
}
