"""Helpers for the SFT/RLAIF stage tests: one tiny model per test process, spec and StageRun builders,
synthetic preference pairs, and launching a stage under torchrun through tests/support/run_stage.py."""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from transformers import TrainerCallback

from dhad_api.jobs import RLAIFJobSpec, SFTJobSpec
from dhad_trainer.stages.base import StageRun

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "trainer" / "dhad_trainer" / "assets"
INSTRUCTIONS = ASSETS / "arabic_instructions.jsonl"
PROMPTS = ASSETS / "arabic_prompts.jsonl"
STORAGE = {"bucket": "test-bucket"}
FAST = {"maxSteps": 2, "microBatchSize": 2, "learningRate": 1e-3, "logEverySteps": 1, "schedule": "constant"}


class StepRecorder(TrainerCallback):
    """Stands in for the runtime's progress callback: proves run.callbacks reach the trainer."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


@functools.cache
def tiny_lm() -> Path:
    """The tiny causal LM, built once per test process (BPE training costs seconds)."""
    from dhad_trainer.local.tiny import init_tiny_model

    root = Path(tempfile.mkdtemp(prefix="dhad-align-"))
    atexit.register(shutil.rmtree, root, True)
    return init_tiny_model(root / "lm", seed=0)


def sft_spec(data: list[dict] | None = None, **training) -> SFTJobSpec:
    data = data or [{"uri": str(INSTRUCTIONS)}]
    return SFTJobSpec.model_validate({"model": {"uri": "/models/base"}, "storage": STORAGE, "data": data,
                                      "training": {"sequenceLength": 256, **FAST, **training},
                                      "checkpoint": {"intervalSteps": 1}})


def rlaif_spec(feedback: dict | None = None, reward: dict | None = None, policy: dict | None = None) -> RLAIFJobSpec:
    fb = {"prompts": [{"uri": str(PROMPTS), "schema": "prompt-completion"}], "samplesPerPrompt": 3,
          "judge": {"model": {"uri": "/models/judge"}, "maxNewTokens": 8, "maxAttempts": 1},
          "generation": {"maxNewTokens": 12, "temperature": 1.0, "topP": 1.0}, "heldOutFraction": 0.25}
    pol = {"generationsPerPrompt": 2, "generation": {"maxNewTokens": 8, "temperature": 1.0},
           "training": {**FAST, "learningRate": 1e-5}}
    return RLAIFJobSpec.model_validate({
        "model": {"uri": "/models/sft"}, "storage": STORAGE, "resources": {"gpusPerNode": 0},
        "checkpoint": {"intervalSteps": 1},
        "feedback": {**fb, **(feedback or {})},
        "reward": {"training": FAST, "sequenceLength": 256, **(reward or {})},
        "policy": {**pol, **(policy or {})},
    })


def stage_run(spec, stage: str, root: Path, model_dir: Path, **kw) -> StageRun:
    root.mkdir(parents=True, exist_ok=True)
    return StageRun(spec=spec, stage=stage, model_dir=Path(model_dir), work_dir=root / "work",
                    output_dir=root / "out", **kw)


def write_pairs(directory: Path, n_train: int = 8, n_heldout: int = 4) -> Path:
    """A feedback-stage output folder with easy pairs: the chosen answer is Arabic, the rejected is noise."""
    from dhad_trainer.stages.alignment import PAIRS_DIR, PROMPTS_DIR, write_jsonl

    rows = [json.loads(line) for line in INSTRUCTIONS.read_text(encoding="utf-8").splitlines()]
    pairs = [{"prompt": r["messages"][:-1], "chosen": r["messages"][-1:],
              "rejected": [{"role": "assistant", "content": "xq zz 123 ..."}]} for r in rows]
    write_jsonl(directory / PAIRS_DIR / "train-00000-of-00001.jsonl", pairs[:n_train])
    write_jsonl(directory / PAIRS_DIR / "heldout-00000-of-00001.jsonl", pairs[n_train:n_train + n_heldout])
    write_jsonl(directory / PROMPTS_DIR / "train.jsonl", ({"prompt": p["prompt"]} for p in pairs[:n_train]))
    return directory


def assert_ranks_trained_one_model(results: list[dict], start: Path) -> str:
    """Every rank ended training with the same weights, they are the saved model's, and they moved off
    `start`: the ranks trained one model together (DDP keeps replicas identical), not each its own."""
    from transformers import AutoModelForCausalLM

    from dhad_trainer.runtime.callbacks import weights_sha256

    digests = [r["weights_sha256"] for r in results]
    assert len(digests) >= 2 and None not in digests and len(set(digests)) == 1, digests
    saved = weights_sha256(AutoModelForCausalLM.from_pretrained(results[0]["model_dir"]))
    assert saved == digests[0], "the saved model is not the weights the ranks trained"
    assert weights_sha256(AutoModelForCausalLM.from_pretrained(start)) != saved, "training changed nothing"
    return saved


def step(stage: str, spec, root: Path, model_dir: Path, inputs: dict | None = None, *, name: str | None = None,
         **extra) -> dict:
    """One stage for `torchrun_stages`; its StageRun gets root/work and root/out. `name` keys its results
    (default the stage); `extra` may hold "resume_from" (a checkpoint folder) and "reward_function"
    ("module:name"); DeepSpeed or FSDP come from the spec's `distributed`."""
    return {"stage": stage, "name": name or stage, "kind": type(spec).__name__, "spec": spec.to_json_dict(),
            "model_dir": str(model_dir), "root": str(root), "inputs": {k: str(v) for k, v in (inputs or {}).items()},
            **extra}


def torchrun_stages(steps: list[dict], root: Path, nproc: int = 2, timeout: int = 300) -> dict[str, list[dict]]:
    """Run the steps in order under one `torchrun --nproc-per-node nproc` on CPU; each step's per-rank results."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "job.json").write_text(json.dumps({"steps": steps}), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
           str(REPO / "tests" / "support" / "run_stage.py"), str(root / "job.json")]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return {s["name"]: [json.loads((Path(s["root"]) / f"result-rank{r}.json").read_text()) for r in range(nproc)]
            for s in steps}


@functools.cache
def distributed_chain() -> dict[str, list[dict]]:
    """SFT -> feedback (local tiny judge) -> GRPO, each on 2 CPU processes, in one torchrun launch per test
    process (launches cost tens of seconds on a small machine). The reward model is the tiny LM's backbone."""
    root = Path(tempfile.mkdtemp(prefix="dhad-dist-"))
    atexit.register(shutil.rmtree, root, True)
    prompts = root / "prompts.jsonl"
    questions = ["ما عاصمة ليبيا؟", "اذكر نوعًا من الطيور.", "ما أطول نهر عربي؟", "عرّف الكرم."]
    prompts.write_text("".join(json.dumps({"prompt": q}, ensure_ascii=False) + "\n" for q in questions), encoding="utf-8")
    spec = rlaif_spec(
        feedback={"prompts": [{"uri": str(prompts), "schema": "prompt-completion"}], "pairs": "all-pairs",
                  "constitution": "كن مفيدًا وصادقًا.", "judge": {"model": {"uri": "/unused"}, "maxNewTokens": 4,
                                                                  "maxAttempts": 1}},
        policy={"training": {"maxSteps": 2, "microBatchSize": 2, "learningRate": 1e-3}})
    sft_out = root / "sft" / "out"
    return torchrun_stages([
        step("sft", sft_spec(), root / "sft", tiny_lm()),
        step("feedback", spec, root / "feedback", sft_out, {"judge": tiny_lm()}),
        step("policy", spec, root / "policy", sft_out,
             {"feedback": root / "feedback" / "out", "reward_model": tiny_lm()}),
    ], root)
