#!/usr/bin/env bash
# Resolves the trainer image's dependency groups ([trainer,gpu]) for Linux x86_64 / Python 3.11 without
# installing anything (uv pip compile; needs PyPI), and prints the versions that matter. The CPU dev venv
# never installs the gpu extra (vLLM pins its own torch).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
uv="$DHAD_CACHE/uv-$UV_VERSION/bin/uv"
out="$(mktemp)"
"$uv" pip compile "$repo/pyproject.toml" --extra trainer --extra gpu --python-version 3.11 \
  --python-platform x86_64-manylinux_2_28 --quiet -o "$out"
grep -E '^(torch|vllm|transformers|trl|deepspeed|accelerate|peft|flash-attn|flashinfer-python|triton)==' "$out"
