"""Pre-flight of the whole job, run by the launcher before its first sub-stage, without torch.

Whatever a later sub-stage needs is checked now, while no GPU time has been spent: a vLLM import that
fails in the policy sub-stage would otherwise come after hours of feedback and reward training. Each
failure raises ConfigError naming the field (the launcher exits 78, BadConfig, and the operator fails
the job without a restart); an unreachable Hugging Face Hub raises StorageError (retryable).

- capabilities: vLLM (policy.useVllm, respond.teacher.useVllm on GPUs), flash-attn (model.attention),
  DeepSpeed and the ops its config makes it load (CPU Adam for offload: prebuilt, or a C++ toolchain to
  build it), precisions the strategy cannot run, GPUs for GPU-only features;
- access: every model (model, tokenizer, judge, teacher, reward model) and dataset of every sub-stage,
  hf:// ones with the job's Hugging Face token (hfTokenSecretRef, as HF_TOKEN) through the Hub's
  auth-check, which tells a gated model whose terms the token's account has not accepted;
- disk: the work volume (DHAD_WORK_DIR) holds the model and two local checkpoints (HF Trainer keeps two).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import os
import shutil
import sysconfig
from pathlib import Path

from dhad_api.common import Attention, Strategy
from dhad_api.jobs import Job, JobSpec, PretrainJobSpec, RLAIFJobSpec, SFTJobSpec, stage_pods, stages_for
from dhad_api.plan import Architecture, checkpoint_bytes_per_node, gib, known_architecture
from dhad_api.references import COMPARE, model_specs
from dhad_api.training import Optimization, Precision
from dhad_trainer.storage.base import StorageError

log = logging.getLogger("dhad_trainer.runtime.preflight")


class PreflightError(Exception):
    """Raised as the launcher's ConfigError (see `check_job`)."""


def installed(module: str) -> bool:
    """Importable in this environment, found without importing it (vLLM and flash-attn import torch)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def optimizations(spec: JobSpec) -> list[tuple[str, Optimization]]:
    """(field path, settings) of every training sub-stage."""
    if isinstance(spec, PretrainJobSpec | SFTJobSpec):
        return [("training", spec.training)]
    if isinstance(spec, RLAIFJobSpec):
        return [("reward.training", spec.reward.training), ("policy.training", spec.policy.training)]
    return []


# ------------------------------------------------------------------------------------- capabilities


def deepspeed_prebuilt_ops() -> dict[str, bool]:
    """DeepSpeed's installed_ops (ops built into the wheel at install time), read without importing it."""
    spec = importlib.util.find_spec("deepspeed")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(next(iter(spec.submodule_search_locations))) / "git_version_info_installed.py"
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError):
        return {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "installed_ops" for t in node.targets):
            try:
                return dict(ast.literal_eval(node.value))
            except ValueError:
                return {}
    return {}


def cpp_toolchain_missing() -> list[str]:
    """What DeepSpeed's just-in-time C++ build (torch.utils.cpp_extension) lacks here."""
    missing = []
    if not (shutil.which("c++") or shutil.which("g++")):
        missing.append("a C++ compiler (g++)")
    if not (shutil.which("ninja") or installed("ninja")):
        missing.append("ninja")
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        missing.append("the Python headers (Python.h)")
    return missing


def check_capabilities(spec: JobSpec, stages: list[str]) -> None:
    gpus = spec.resources.gpus_per_node
    if isinstance(spec, RLAIFJobSpec) and spec.policy.use_vllm:
        if not installed("vllm"):
            raise PreflightError("policy.useVllm: vLLM is not installed in this trainer image (it comes with the image's "
                                 "gpu extra); use an image built with it, or set policy.useVllm false")
        if gpus == 0:
            raise PreflightError("policy.useVllm: vLLM runs on GPUs, but resources.gpusPerNode is 0")
    if isinstance(spec, SFTJobSpec) and "respond" in stages and spec.respond.teacher.use_vllm and gpus:
        if not installed("vllm"):  # on CPU the teacher falls back to transformers (documented)
            raise PreflightError("respond.teacher.useVllm: vLLM is not installed in this trainer image (the image's gpu "
                                 "extra provides it); use an image built with it, or set useVllm false")
    for field, model in [("model", spec.model), *((f"{role}", m) for role, m in model_specs(spec).items() if role != "model")]:
        if model.attention == Attention.FLASH_ATTENTION_2:
            where = "model" if field == "model" else field
            if not installed("flash_attn"):
                raise PreflightError(f"{where}.attention: flash-attention-2 needs the flash-attn package, which this "
                                     "trainer image lacks (the image's gpu extra provides it); use sdpa or auto")
            if gpus == 0:
                raise PreflightError(f"{where}.attention: flash-attention-2 runs on GPUs, but resources.gpusPerNode is 0")
    d = spec.distributed
    if d.strategy == Strategy.DEEPSPEED:
        if not installed("deepspeed"):
            raise PreflightError("distributed.strategy: deepspeed is not installed in this trainer image")
        from dhad_trainer.runtime.deepspeed_config import needed_ops

        prebuilt = deepspeed_prebuilt_ops()
        for op in needed_ops(d):
            missing = [] if prebuilt.get(op) else cpp_toolchain_missing()
            if missing:
                raise PreflightError(f"distributed.offload: {d.offload.value} needs DeepSpeed's {op} op, which is not "
                                     f"prebuilt in this image and cannot be built here (missing: {', '.join(missing)})")
        for field, opt in optimizations(spec):
            if opt.precision == Precision.BF16_PURE:
                raise PreflightError(f"{field}.precision: bf16-pure is for ddp and fsdp; DeepSpeed keeps fp32 master "
                                     "weights itself (use bf16)")


def packages_needed(spec: JobSpec, stages: list[str]) -> dict[str, str]:
    """Distribution name -> the feature of this job that imports it (what the trainer image must provide)."""
    need = {"torch": "training", "transformers": "models", "accelerate": "HF Trainer", "datasets": "data",
            "minio": "storage (S3)", "safetensors": "model files"}
    uris = [u for _, u in dataset_references(spec)] + [m.uri or "" for m in model_specs(spec).values()]
    if any(u.startswith("hf://") for u in uris):
        need["huggingface-hub"] = "hf:// references"
    if spec.distributed.strategy == Strategy.DEEPSPEED:
        need["deepspeed"] = "distributed.strategy deepspeed"
    if isinstance(spec, SFTJobSpec | RLAIFJobSpec):
        need["trl"] = "SFT/RLAIF trainers"
    if isinstance(spec, SFTJobSpec) and spec.training.lora:
        need["peft"] = "training.lora"
    if isinstance(spec, PretrainJobSpec):
        need |= {"datasketch": "data.dedup", "pyarrow": "prepared shards"}
    if isinstance(spec, RLAIFJobSpec) and spec.policy.use_vllm:
        need["vllm"] = "policy.useVllm"
    if isinstance(spec, SFTJobSpec) and "respond" in stages and spec.respond.teacher.use_vllm:
        need["vllm"] = "respond.teacher.useVllm"
    gpus, attention = spec.resources.gpus_per_node, spec.model.attention
    if attention == Attention.FLASH_ATTENTION_2 or (attention == Attention.AUTO and gpus and isinstance(spec, PretrainJobSpec)):
        need["flash-attn"] = f"model.attention {attention.value} (packed sequences on GPUs)"
    return need


# ------------------------------------------------------------------------------------------- access


def hf_repo(uri: str) -> tuple[str, str | None]:
    repo, _, revision = uri.removeprefix("hf://").partition("@")
    return repo, revision or None


def check_hf(uri: str, field: str, repo_type: str = "model") -> None:
    """The Hub's auth-check for `uri` with HF_TOKEN: exists, and the token may read it (gated models)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false"):
        log.warning("%s: %s not checked (HF_HUB_OFFLINE is set; the local Hugging Face cache must hold it)", field, uri)
        return
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    repo, _ = hf_repo(uri)
    token = os.environ.get("HF_TOKEN") or None
    try:
        HfApi().auth_check(repo, repo_type=repo_type, token=token)
    except GatedRepoError:
        who = "the token in hfTokenSecretRef has no access" if token else "no token is set (hfTokenSecretRef)"
        raise PreflightError(f"{field}: {uri} is gated and {who}: accept its terms on the Hub with the token's account "
                             "and reference that token in spec.hfTokenSecretRef") from None
    except RepositoryNotFoundError:
        raise PreflightError(f"{field}: {uri} does not exist on the Hugging Face Hub, or is private and "
                             f"{'the token in hfTokenSecretRef cannot read it' if token else 'no token is set (hfTokenSecretRef)'}") from None
    except (HfHubHTTPError, OSError) as error:
        raise StorageError(f"{field}: cannot reach the Hugging Face Hub to check {uri}: {error}") from None


def model_references(job: Job, spec: JobSpec) -> list[tuple[str, str]]:
    """(field, uri) of every model the job reads that exists before it starts."""
    resolved = job.resolved
    refs = [("model.uri", resolved.model_uri or spec.model.uri)]
    if spec.model.tokenizer:
        refs.append(("model.tokenizer", spec.model.tokenizer))
    by_role = {"judge": resolved.judge_model_uri, "reward": resolved.reward_model_uri, "teacher": resolved.teacher_model_uri}
    fields = {"judge": "feedback.judge.model.uri" if isinstance(spec, RLAIFJobSpec) else "evaluation.judge.model.uri",
              "reward": "policy.rewardModel.uri", "teacher": "respond.teacher.model.uri"}
    compared = [c.name for c in getattr(getattr(spec, "evaluation", None), "compare", None) or ()]
    for role, model in model_specs(spec).items():
        if role.startswith(COMPARE):  # evaluation.compare[i]: resolved by name (fromJob or a uri)
            name = role.removeprefix(COMPARE)
            refs.append((f"evaluation.compare[{compared.index(name)}].model.uri",
                         resolved.compare_model_uris.get(name) or model.uri))
        elif role != "model":
            refs.append((fields[role], by_role.get(role) or model.uri))
    return [(f, u) for f, u in refs if u]


def dataset_references(spec: JobSpec) -> list[tuple[str, str]]:
    """(field, uri) of every dataset any sub-stage reads."""
    refs: list[tuple[str, str]] = []
    if isinstance(spec, PretrainJobSpec):
        refs += [(f"data.sources[{i}].uri", s.uri) for i, s in enumerate(spec.data.sources)]
        refs += [(f"data.decontamination.benchmarks[{i}]", u) for i, u in enumerate(spec.data.decontamination.benchmarks)]
        refs += [("vocabulary.corpus", spec.vocabulary.corpus)] if spec.vocabulary.corpus else []
    if isinstance(spec, SFTJobSpec):
        refs += [(f"data[{i}].uri", d.uri) for i, d in enumerate(spec.data)]
        if spec.respond:
            refs += [(f"respond.prompts[{i}].uri", p.uri) for i, p in enumerate(spec.respond.prompts)]
    if isinstance(spec, RLAIFJobSpec):
        refs += [(f"feedback.prompts[{i}].uri", p.uri) for i, p in enumerate(spec.feedback.prompts)]
        refs += [("reward.cultureSet", spec.reward.culture_set)] if spec.reward.culture_set else []
    evaluation = getattr(spec, "evaluation", None)
    if evaluation is not None:
        refs += [("evaluation.benchmarks", evaluation.benchmarks)] if evaluation.benchmarks else []
        refs += [("evaluation.referenceAnswers", evaluation.reference_answers)] if evaluation.reference_answers else []
    return refs


def check_hf_references(job: Job, spec: JobSpec) -> None:
    for field, uri in model_references(job, spec):
        if uri.startswith("hf://"):
            check_hf(uri, field, "model")
    for field, uri in dataset_references(spec):
        if uri.startswith("hf://"):
            check_hf(uri, field, "dataset")


# --------------------------------------------------------------------------------------------- disk


def work_volume() -> Path:
    path = Path(os.environ.get("DHAD_WORK_DIR", "/tmp/dhad"))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def model_size(uri: str, storage) -> tuple[int, dict | None]:
    """(bytes, config.json) of a model folder in S3 or on a path; (0, None) when it cannot be read here."""
    from dhad_trainer.storage.routing import open_store

    if uri.startswith("hf://"):
        return 0, None
    store = open_store(uri, storage)
    prefix = uri.rstrip("/")
    files = [p for p in store.list(prefix + "/")]
    total = sum(store.size(p) for p in files)
    config = None
    if any(p.endswith("/config.json") for p in files):
        with store.open(f"{prefix}/config.json") as f:
            config = json.loads(f.read())
    return total, config


def check_disk(job: Job, spec: JobSpec, stages: list[str]) -> None:
    """Free space on the work volume >= the model + two checkpoints of this node (estimated from its size)."""
    uri = job.resolved.model_uri or spec.model.uri
    size, config = model_size(uri, spec.storage)
    if not size:
        return
    arch: Architecture | None = known_architecture(uri)
    if config is not None and "num_attention_heads" in config:
        arch = Architecture.from_config(config)
    checkpoints = 0
    for _, opt in optimizations(spec):
        if arch is not None:
            nodes = max(stage_pods(job.kind, spec, s).pods for s in stages)
            checkpoints = max(checkpoints, checkpoint_bytes_per_node(arch, spec, opt, nodes))
    need = size + 2 * checkpoints
    volume = work_volume()
    free = shutil.disk_usage(volume).free
    if free < need:
        raise PreflightError(f"resources: the work volume {volume} has {gib(free)} free, but the model ({gib(size)}) and "
                             f"two checkpoints ({gib(2 * checkpoints)}) need {gib(need)}; give the pod more ephemeral "
                             "storage or mount a larger volume at DHAD_WORK_DIR (podTemplate.volumes)")


def check_job(job: Job) -> None:
    """Everything every sub-stage will need; raises PreflightError (BadConfig) or StorageError."""
    spec = job.typed_spec()
    stages = stages_for(job.kind, spec)
    check_capabilities(spec, stages)
    check_hf_references(job, spec)
    check_disk(job, spec, stages)
