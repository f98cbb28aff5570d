#!/usr/bin/env bash
# The GPU check (issue 16): on a machine with one NVIDIA GPU, in under 10 minutes, a ~1B Llama with random
# weights in bf16 mixed precision (fp32 master weights) through the trainer's own DDP, DeepSpeed ZeRO-2 and
# FSDP configs, with sdpa and (when flash-attn is installed) flash-attention-2; one JSON line per run:
# tokens/s, MFU against the GPU's bf16 peak, peak memory, and the plan's prediction for the same job.
#   bash bench/gpu_check.sh            # on the GPU machine (from the repository root, with the venv)
#   bash bench/gpu_check.sh --dry-run  # tiny model on CPU: checks the script here
# Env: PYTHON (default .venv/bin/python), STEPS (12), SEQ (2048), MICRO (4), PER_RUN_TIMEOUT (150 s).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
STEPS="${STEPS:-12}" SEQ="${SEQ:-2048}" MICRO="${MICRO:-4}" PER_RUN_TIMEOUT="${PER_RUN_TIMEOUT:-150}"
extra=("$@")
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${HOME}/.cache/dhad/torch-extensions}"
if [[ " ${extra[*]-} " != *" --dry-run "* ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "gpu_check: no NVIDIA GPU (nvidia-smi failed); use --dry-run" >&2; exit 2; }
fi
"$PYTHON" -c "import torch, transformers, deepspeed, accelerate; print(f'torch {torch.__version__} cuda {torch.version.cuda} transformers {transformers.__version__} deepspeed {deepspeed.__version__} accelerate {accelerate.__version__}')" 2>/dev/null | tail -1
runs=("ddp sdpa" "zero2 sdpa" "fsdp sdpa")
if "$PYTHON" -c "import flash_attn" 2>/dev/null; then
  runs+=("ddp flash-attention-2")
else
  echo "gpu_check: flash-attn not installed: flash-attention-2 run skipped (the trainer image's gpu extra has it)"
fi
failed=0
for r in "${runs[@]}"; do
  read -r strategy attention <<<"$r"
  port=$((29600 + RANDOM % 1000))
  echo "== $strategy / $attention"
  timeout "$PER_RUN_TIMEOUT" "$PYTHON" -m torch.distributed.run --nproc-per-node 1 --master-port "$port" \
    bench/gpu_check.py --strategy "$strategy" --attention "$attention" --steps "$STEPS" --seq "$SEQ" --micro "$MICRO" \
    ${extra[@]+"${extra[@]}"} 2>"/tmp/gpu_check-$strategy-$attention.log" | grep '^{' || {
      failed=1; echo "gpu_check: $strategy/$attention failed; log tail:"; tail -20 "/tmp/gpu_check-$strategy-$attention.log"; }
done
exit "$failed"
