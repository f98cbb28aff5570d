"""The memory plan (`dhad_api.plan`, `dhad plan`) against what it predicts:

- parameter counts and DeepSpeed's own ZeRO-2/ZeRO-3 model-state estimators, fed with the parameters of
  the real transformers model (built on the meta device, no memory), within 10%;
- the activations autograd really keeps for a tiny Llama on CPU (summed with saved-tensor hooks), with and
  without gradient checkpointing, in fp32, bf16 autocast and pure bf16, at shapes other than the ones the
  formula was read from;
- the peak memory of a real training step of a small model on CPU (a fresh process's peak RSS);
- the Planned condition the operator will set, and the four GPU examples, which must fit their GPUs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from dhad_api.common import Strategy
from dhad_api.jobs import SFTJobSpec, parse_spec
from dhad_api.plan import (
    KNOWN_ARCHITECTURES,
    Architecture,
    GiB,
    StagePlan,
    activation_components,
    gpu_from_labels,
    plan_job,
    planned_condition,
    saved_bytes_per_token,
    state_components,
    stream_bytes,
)
from dhad_api.reasons import Reason
from dhad_api.training import Precision

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p for p in (REPO / "examples" / "gpu").glob("*.yaml") if p.stem != "acegpt-7b-pipeline")  # job kinds


def llama_config(arch: Architecture) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
                                    intermediate_size=arch.intermediate_size, num_hidden_layers=arch.num_layers,
                                    num_attention_heads=arch.num_heads, num_key_value_heads=arch.num_kv_heads,
                                    max_position_embeddings=arch.max_positions, tie_word_embeddings=arch.tie_embeddings)


def meta_model(arch: Architecture):
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(llama_config(arch))


@pytest.mark.parametrize("name", ["meta-llama/llama-2-7b-hf", "meta-llama/llama-2-13b-hf", "meta-llama/llama-2-70b-hf",
                                  "meta-llama/meta-llama-3-8b"])
def test_parameter_counts_match_the_real_model(name):
    arch = KNOWN_ARCHITECTURES[name]
    model = meta_model(arch)
    assert arch.parameters == sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    assert arch.largest_layer == largest
    assert Architecture.from_config(llama_config(arch).to_dict()).parameters == arch.parameters


def zero_states(arch, stage: int, offload: str, nodes: int, gpus: int) -> int:
    from dhad_api.common import Offload

    plan = StagePlan("x", "x", nodes * gpus)
    state_components(plan, arch, arch.parameters, 0, Precision.BF16, Strategy.DEEPSPEED, stage, Offload(offload),
                     nodes * gpus, nodes * gpus, gpus)
    return plan.total


@pytest.mark.parametrize("name", ["meta-llama/llama-2-7b-hf", "meta-llama/llama-2-13b-hf", "meta-llama/llama-2-70b-hf"])
@pytest.mark.parametrize(("nodes", "gpus"), [(1, 8), (2, 8), (4, 8)])
def test_zero_model_states_within_10_percent_of_deepspeeds_estimators(name, nodes, gpus):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    arch = KNOWN_ARCHITECTURES[name]
    model = meta_model(arch)  # counted as DeepSpeed's model_to_params do (which dedup by data_ptr: 0 on meta)
    total = total3 = sum({id(p): p.numel() for p in model.parameters()}.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    _, ds2 = estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload=False)
    _, ds2_offload = estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload=True)
    _, ds3, _ = estimate_zero3_model_states_mem_needs(total3, largest, gpus, nodes, cpu_offload=False, cpu_offload_params=False)
    _, ds3_opt, _ = estimate_zero3_model_states_mem_needs(total3, largest, gpus, nodes, cpu_offload=True, cpu_offload_params=False)
    _, ds3_all, _ = estimate_zero3_model_states_mem_needs(total3, largest, gpus, nodes, cpu_offload=True, cpu_offload_params=True)
    for ours, theirs in [(zero_states(arch, 2, "none", nodes, gpus), ds2),
                         (zero_states(arch, 2, "optimizer", nodes, gpus), ds2_offload),
                         (zero_states(arch, 3, "none", nodes, gpus), ds3),
                         (zero_states(arch, 3, "optimizer", nodes, gpus), ds3_opt),
                         (zero_states(arch, 3, "optimizer-and-parameters", nodes, gpus), ds3_all)]:
        assert ours == pytest.approx(theirs, rel=0.10), (ours / GiB, theirs / GiB)


def measured_saved_bytes(arch: Architecture, batch: int, seq: int, mode: str, checkpointing: bool) -> int:
    """Bytes of every distinct tensor autograd saves in one forward (weights and their autocast copies, which
    linear layers keep transposed, excluded: the plan counts those as model states)."""
    model = transformers.LlamaForCausalLM(llama_config(arch))
    model.config._attn_implementation = "sdpa"
    if mode == "pure":
        model = model.bfloat16()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = {tuple(p.shape) for p in model.parameters()} | {tuple(p.shape)[::-1] for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights and tuple(t.shape) not in shapes:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, arch.vocab_size, (batch, seq))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "mixed")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model(input_ids=ids, labels=ids, use_cache=False)
    return sum(seen.values())


MODES = {"fp32": (Precision.FP32, Strategy.DDP), "mixed": (Precision.BF16, Strategy.DDP),
         "pure": (Precision.BF16_PURE, Strategy.DDP)}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activations_match_what_autograd_keeps_for_a_tiny_llama(mode, checkpointing):
    arch = Architecture("tiny", vocab_size=1500, hidden_size=192, intermediate_size=520, num_layers=3, num_heads=6,
                        num_kv_heads=3, max_positions=512)
    batch, seq = 3, 100
    measured = measured_saved_bytes(arch, batch, seq, mode, checkpointing)
    precision, strategy = MODES[mode]
    residual, compute = stream_bytes(precision, strategy)
    tokens = batch * seq
    if checkpointing:  # forward keeps only each layer's input (the recompute happens in backward)
        predicted = tokens * residual * arch.hidden_size * arch.num_layers
    else:
        predicted = tokens * saved_bytes_per_token(arch, residual, compute) * arch.num_layers
    # the model's tail keeps the final norm's tensors and the fp32 log-softmax of the loss
    predicted += tokens * (4 * arch.hidden_size + 2 * residual * arch.hidden_size + 4 * arch.vocab_size)
    assert measured == pytest.approx(predicted, rel=0.10), (measured, predicted)


PEAK_SCRIPT = r"""
import json, sys, torch, transformers

def status(key):  # kB figures of this process's own memory map (ru_maxrss would carry the parent's over exec)
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

spec = json.loads(sys.argv[1])
torch.manual_seed(0)
cfg = transformers.LlamaConfig(**spec["config"])
with torch.device("meta"):
    transformers.LlamaForCausalLM(cfg)  # import-time and lazy allocations before the baseline
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
base = status("VmRSS")
model = transformers.LlamaForCausalLM(cfg)
model.config._attn_implementation = "sdpa"
if spec["checkpointing"]:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
ids = torch.randint(0, cfg.vocab_size, (spec["batch"], spec["seq"]))
for p in model.parameters():  # gradients and AdamW moments in place, as from an earlier step, at no forward's cost
    p.grad = torch.zeros_like(p)
opt.step()
model(input_ids=ids, labels=ids, use_cache=False).loss.backward()  # the step whose peak is measured
opt.step()
print(json.dumps({"base": base, "peak": status("VmHWM") - base}))
"""


@pytest.mark.parametrize("checkpointing", [False, True])
def test_plan_predicts_the_measured_peak_of_a_cpu_training_step(checkpointing):
    """A 33.5M-parameter Llama, fp32, one process: weights, gradients, AdamW moments and activations, against
    the process's peak RSS above its start (VmHWM, reset at the baseline). RSS counts live memory only with
    glibc's mmap threshold fixed: by default it rises after the first large free, and later tensors come from
    a heap that never shrinks (measured: 27% above the live peak then, 1-3% with the threshold fixed)."""
    arch = Architecture("small", vocab_size=8000, hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8,
                        num_kv_heads=8, max_positions=512)
    batch, seq = 4, 256
    spec = {"config": llama_config(arch).to_dict(), "batch": batch, "seq": seq, "checkpointing": checkpointing}
    proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, json.dumps(spec)], capture_output=True, text=True,
                          timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])["peak"]
    plan = StagePlan("x", "x", 1)
    state_components(plan, arch, arch.parameters, 0, Precision.FP32, Strategy.DDP, 0, None, 1, 1, 1)
    activation_components(plan, arch, batch, seq, Precision.FP32, Strategy.DDP, checkpointing)
    assert measured == pytest.approx(plan.total, rel=0.10), (measured / 2**20, plan.total / 2**20, plan.components)


def example(path: Path):
    doc = yaml.safe_load(path.read_text())
    return doc["kind"], parse_spec(doc["kind"], doc["spec"])


def lookup(kind: str, name: str):
    for path in EXAMPLES:
        doc = yaml.safe_load(path.read_text())
        if (doc["kind"], doc["metadata"]["name"]) == (kind, name):
            return doc["spec"]
    return None


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_gpu_example_plans_within_its_gpus(path):
    kind, spec = example(path)
    verdict = planned_condition(kind, spec, lookup=lookup)
    assert verdict.status == "True" and verdict.reason == Reason.PLAN_FITS, verdict.message
    assert verdict.plan.gpu.memory == 81559 * 2**20  # from the examples' nvidia.com/gpu.product nodeSelector
    assert verdict.plan.architecture.name == "Llama-2-7B"
    assert "GiB per GPU" in verdict.message or "needs" in verdict.message


def test_sft_example_without_gradient_checkpointing_is_refused_with_the_numbers():
    kind, spec = example(REPO / "examples" / "gpu" / "acegpt-7b-sft.yaml")
    spec = spec.model_copy(update={"training": spec.training.model_copy(update={"gradient_checkpointing": False})})
    verdict = planned_condition(kind, spec, lookup=lookup)
    assert verdict.status == "False" and verdict.refuse and verdict.reason == Reason.PLAN_EXCEEDS_GPU_MEMORY
    assert "sft" in verdict.message and "79.6 GiB" in verdict.message and "activations" in verdict.message
    opted_out = spec.model_copy(update={"plan": spec.plan.model_copy(update={"enforce": False})})
    verdict = planned_condition(kind, opted_out, lookup=lookup)
    assert verdict.status == "False" and not verdict.refuse  # reported, not refused


def test_dhad_plan_prints_each_stage_and_exits_by_the_verdict(tmp_path):
    """The command a user runs: the SFT example fits (exit 0, its Planned line); the pipeline prints every
    stage and gate; the same SFT job on a 24 GiB GPU does not fit (exit 2, the numbers in the message)."""
    def dhad_plan(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dhad_trainer.cli", "plan", *args], capture_output=True, text=True, timeout=120)

    sft = REPO / "examples" / "gpu" / "acegpt-7b-sft.yaml"
    fits = dhad_plan("-f", str(sft))
    assert fits.returncode == 0, fits.stderr
    assert fits.stdout.startswith("model Llama-2-7B: ") and "\n  sft: ZeRO-2, bf16, 16 process(es): " in fits.stdout
    assert "Planned=True (PlanFits)" in fits.stdout.splitlines()[-1]
    small = dhad_plan("-f", str(sft), "--gpu-memory", "24Gi")
    assert small.returncode == 2 and "Planned=False (PlanExceedsGPUMemory)" in small.stdout
    assert "more than the 24.0 GiB of one" in small.stdout
    pipeline = dhad_plan("-f", str(REPO / "examples" / "gpu" / "acegpt-7b-pipeline.yaml"))
    assert pipeline.returncode == 0, pipeline.stdout + pipeline.stderr
    labels = [line[3:].split(" (")[0] for line in pipeline.stdout.splitlines() if line.startswith("== ")]
    assert labels[:2] == ["cpt", "sft"] and "sft/gate" in labels and pipeline.stdout.count("Planned=True") == len(labels)


def test_gpu_memory_comes_from_the_field_then_node_labels_then_the_product():
    kind, spec = example(REPO / "examples" / "gpu" / "acegpt-7b-sft.yaml")
    spec = spec.model_copy(update={"pod_template": spec.pod_template.model_copy(update={"node_selector": {"pool": "a"}})})
    nodes = [{"pool": "a", "nvidia.com/gpu.memory": "40960", "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB"},
             {"pool": "b", "nvidia.com/gpu.memory": "81559"}]
    verdict = planned_condition(kind, spec, nodes, lookup=lookup)
    assert verdict.plan.gpu.memory == 40960 * 2**20 and verdict.status == "True"  # 35.8 GiB fits 40 GiB
    small = spec.model_copy(update={"plan": spec.plan.model_copy(update={"gpu_memory": "24Gi"})})
    verdict = planned_condition(kind, small, nodes, lookup=lookup)
    assert verdict.plan.gpu.memory == 24 * GiB and verdict.status == "False"
    unknown = planned_condition(kind, spec, [], lookup=lookup)
    assert unknown.status == "Unknown" and not unknown.refuse and "GPU memory unknown" in unknown.message
    assert gpu_from_labels({"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}).bf16_flops == 989e12


def test_unknown_architecture_and_cpu_jobs_are_not_refused():
    spec = SFTJobSpec.model_validate({"model": {"uri": "s3://bucket/models/mine"}, "storage": {"bucket": "bkt"},
                                      "data": [{"uri": "s3://bucket/d.jsonl"}], "plan": {"gpuMemory": "80Gi"}})
    verdict = planned_condition("SFTJob", spec)
    assert verdict.status == "Unknown" and not verdict.refuse and "architecture unknown" in verdict.message
    cpu = spec.model_copy(update={"resources": spec.resources.model_copy(update={"gpus_per_node": 0})})
    assert planned_condition("SFTJob", cpu).status == "Unknown"


def test_fsdp_and_hybrid_divide_the_states_by_their_shard_group():
    kind, spec = example(REPO / "examples" / "gpu" / "acegpt-7b-sft.yaml")
    arch = KNOWN_ARCHITECTURES["meta-llama/llama-2-7b-hf"]
    full = spec.model_copy(update={"distributed": spec.distributed.model_validate({"strategy": "fsdp"})})
    hybrid = spec.model_copy(update={"distributed": spec.distributed.model_validate({"strategy": "fsdp", "fsdp": {"sharding": "hybrid"}})})
    states = {}
    for name, s in (("full", full), ("hybrid", hybrid)):
        stage = plan_job(kind, s, arch).stages[-1]
        states[name] = dict(stage.components)["optimizer states (sharded)"]
    assert states["full"] == pytest.approx(8 * arch.parameters / 16, rel=1e-6)  # 2 nodes x 8 GPUs
    assert states["hybrid"] == pytest.approx(8 * arch.parameters / 8, rel=1e-6)  # within a node of 8


def test_the_gpu_pipeline_plans_every_stage_and_gate_within_its_gpus():
    """The recipe in one manifest plans as its four job examples do: each stage and gate fits an H100-80GB, and
    stages after the vocabulary expansion are planned with the grown vocabulary (fromJob between stages)."""
    from dhad_api.pipeline import parse_pipeline, plan_pipeline

    doc = yaml.safe_load((REPO / "examples" / "gpu" / "acegpt-7b-pipeline.yaml").read_text())
    steps = plan_pipeline(parse_pipeline(doc["spec"]))
    assert [s.label for s in steps] == ["cpt", "sft", "sft/gate", "rlaif", "rlaif/gate", "eval"]
    for step in steps:
        assert step.verdict.status == "True" and step.verdict.reason == Reason.PLAN_FITS, (step.label, step.verdict.message)
        assert step.verdict.plan.gpu.memory == 81559 * 2**20
    cpt, sft = steps[0].verdict.plan.architecture, steps[1].verdict.plan.architecture
    assert sft.vocab_size == cpt.vocab_size + 2000  # cpt adds 2,000 Arabic tokens
    job = {"SFTJob": "acegpt-7b-sft.yaml", "RLAIFJob": "acegpt-7b-rlaif-grpo.yaml"}  # the pipeline's RLAIF stage is GRPO
    for step in (steps[1], steps[3]):  # the same job as its one-manifest example: the same plan
        kind, spec = example(REPO / "examples" / "gpu" / job[step.kind.value])
        alone = planned_condition(kind, spec, lookup=lookup)
        assert step.verdict.plan.peak.total == alone.plan.peak.total, step.label


def test_ppo_with_lora_counts_the_critic_and_loads_no_separate_reference_or_reward_model():
    kind, spec = example(REPO / "examples" / "gpu" / "acegpt-7b-rlaif.yaml")
    arch = KNOWN_ARCHITECTURES["meta-llama/llama-2-7b-hf"]
    policy = {p.stage: p for p in plan_job(kind, spec, arch).stages}["policy (ppo)"]
    names = dict(policy.components)
    assert "reference model weights" not in names and "reward model weights" not in names
    assert names["critic 16-bit weights"] == 2 * replace(arch, tie_embeddings=True).parameters  # the frozen backbone
    assert names["optimizer states (partitioned)"] < 0.01 * names["16-bit weights"]  # adapters only
    full = spec.model_copy(update={"policy": spec.policy.model_copy(update={"lora": None})})
    names = dict({p.stage: p for p in plan_job(kind, full, arch).stages}["policy (ppo)"].components)
    assert {"reference model weights", "reward model weights"} <= set(names)
    assert names["critic optimizer states (partitioned)"] == pytest.approx(8 * replace(arch, tie_embeddings=True).parameters / 16, rel=1e-6)
