"""Models in and out: resolve a model reference to a local folder; write the final model with a card.

A reference is `s3://bucket/prefix` (a Hugging Face folder, downloaded), `hf://org/name[@revision]`
(`huggingface_hub.snapshot_download`), or a local path / `file://` path (used in place). The card
(README.md) is what the Hugging Face Hub reads: built with huggingface_hub's ModelCard/ModelCardData
(language ar, base_model, license, datasets, model-index results once an EvalJob scored the model),
with a usage snippet, the training recipe and the lineage (every Dhad job from the Hub base model to
this one, with the sha256 of its inputs and the code commit), so a model found in a bucket months
later explains itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from dhad_trainer.storage.base import CHUNK
from dhad_trainer.storage.routing import open_store

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[3]
DONE = ".dhad-complete"  # marks a finished download, so a restarted pod does not trust half a folder


def parse_hf(uri: str) -> tuple[str, str | None]:
    """`hf://org/name@rev` -> ("org/name", "rev")."""
    ref = uri.removeprefix("hf://")
    repo, _, revision = ref.partition("@")
    return repo, revision or None


def resolve_model(uri: str, dest: Path, storage=None) -> Path:
    """A local folder holding the model `uri` names; downloads into `dest` unless it is local already."""
    if uri.startswith("s3://"):
        marker = dest / DONE
        if marker.exists() and marker.read_text() == uri:
            return dest
        store = open_store(uri, storage)
        files = store.download_dir(uri, dest)
        if not files:
            raise FileNotFoundError(f"model {uri}: no objects under this prefix")
        marker.write_text(uri)
        log.info("model %s downloaded to %s (%d files)", uri, dest, len(files))
        return dest
    if uri.startswith("hf://"):
        from huggingface_hub import snapshot_download

        repo, revision = parse_hf(uri)
        path = snapshot_download(repo_id=repo, revision=revision, local_dir=str(dest),
                                 token=os.environ.get("HF_TOKEN") or None,
                                 allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"])
        return Path(path)
    path = Path(uri.removeprefix("file://"))
    if not (path / "config.json").exists() and not (path / "tokenizer_config.json").exists():
        raise FileNotFoundError(f"model {uri}: no config.json or tokenizer_config.json in {path}")
    return path


def code_version() -> dict:
    """The dhad package version and, when known, the git commit (env DHAD_GIT_COMMIT or the checkout)."""
    try:
        version = metadata.version("dhad")
    except metadata.PackageNotFoundError:
        version = "unknown"
    commit = os.environ.get("DHAD_GIT_COMMIT")
    if not commit and (REPO / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                    text=True, timeout=10, check=True).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            commit += "-dirty" if dirty else ""
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {"dhad": version, "commit": commit}


def tree_hash(folder: Path) -> str:
    """sha256 over (relative path, sha256 of content) of every file: one fingerprint for a folder."""
    outer = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != DONE):
        inner = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                inner.update(chunk)
        outer.update(f"{path.relative_to(folder).as_posix()}\0{inner.hexdigest()}\n".encode())
    return outer.hexdigest()



CARD = "README.md"
# Suite -> (Hub dataset id, name shown, metric): model-index entries of an EvalJob's scores.
SUITES = {
    "acva": ("FreedomIntelligence/ACVA-Arabic-Cultural-Value-Alignment", "ACVA", "accuracy"),
    "arabic-mmlu": ("FreedomIntelligence/ArabicMMLU", "Arabic MMLU", "accuracy"),
    "exams": ("FreedomIntelligence/EXAMs", "EXAMs (Arabic)", "accuracy"),
    "vicuna-80": ("FreedomIntelligence/Arabic-Vicuna-80", "Arabic Vicuna-80", "win_rate"),
    "alpaca-eval": ("FreedomIntelligence/Arabic-AlpacaEval", "Arabic AlpacaEval", "win_rate"),
}
USAGE_PROMPT = "ما هي عاصمة المغرب؟"

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ summary }}

## Use it

```python
{{ usage }}
```

## Training recipe

| setting | value |
|---|---|
{% for key, value in recipe.items() -%}
| {{ key }} | {{ value }} |
{% endfor %}
{% if data %}
## Data

{% for uri in data -%}
- `{{ uri }}`
{% endfor %}
{% endif %}
{% if results %}
## Evaluation

| benchmark | method | score |
|---|---|---|
{% for r in results -%}
| {{ r.name }} | {{ r.method }} | {{ r.value }} |
{% endfor %}
{% endif %}
## Lineage

| # | job | stage | output | trained | code |
|---|---|---|---|---|---|
{% for step in lineage -%}
| {{ loop.index }} | {{ step.job }} | {{ step.stage }} | `{{ step.output or "-" }}` | {{ step.date }} | {{ step.commit or "unknown" }} |
{% endfor %}

Started from `{{ base_uri }}`{% if base_model %} (Hub base model `{{ base_model }}`){% endif %}.

## Reproduce

Inputs (sha256):

```json
{{ inputs }}
```

<details><summary>Job spec ({{ kind }})</summary>

```json
{{ spec }}
```

</details>
"""


def hub_id(uri: str | None) -> str | None:
    """`hf://org/name@rev` -> "org/name"; anything else has no Hub id."""
    return parse_hf(uri)[0] if uri and uri.startswith("hf://") else None


def read_card(folder: Path | None):
    """The ModelCard in `folder` (README.md), or None."""
    from huggingface_hub import ModelCard

    path = Path(folder) / CARD if folder else None
    if path is None or not path.exists():
        return None
    try:
        return ModelCard.load(path, ignore_metadata_errors=True)
    except Exception as error:  # noqa: BLE001 - a broken base card must not fail training
        log.warning("cannot read the model card %s: %s", path, error)
        return None


def dataset_uris(spec) -> list[str]:
    """Every dataset a typed spec reads, in spec order."""
    uris: list[str] = []
    data = getattr(spec, "data", None)
    if data is not None and hasattr(data, "sources"):
        uris += [s.uri for s in data.sources]
    elif isinstance(data, list):
        uris += [d.uri for d in data]
    respond = getattr(spec, "respond", None)
    if respond is not None:
        uris += [p.uri for p in respond.prompts]
    feedback = getattr(spec, "feedback", None)
    if feedback is not None:
        uris += [p.uri for p in feedback.prompts]
    return list(dict.fromkeys(uris))


def recipe(spec, stage: str) -> dict[str, Any]:
    """The settings that shape the model, for the card's table."""
    training = getattr(spec, "training", None)
    if stage in ("reward", "policy"):
        training = getattr(spec, stage).training
    rows: dict[str, Any] = {"stage": stage, "nodes x GPUs": f"{spec.resources.nodes} x {spec.resources.gpus_per_node}",
                            "distributed": spec.distributed.strategy.value}
    if stage == "policy":
        rows["algorithm"] = spec.policy.algorithm.value
        rows["KL coefficient"] = spec.policy.kl_coefficient
    if training is not None:
        for field in ("learning_rate", "schedule", "warmup_steps", "max_steps", "epochs", "max_tokens",
                      "micro_batch_size", "gradient_accumulation_steps", "sequence_length", "packing", "precision", "seed"):
            value = getattr(training, field, None)
            if value is not None:
                rows[field.replace("_", " ")] = getattr(value, "value", value)
        lora = getattr(training, "lora", None)
        if lora is not None:
            rows["LoRA"] = f"r={lora.r}"
    return rows


def usage_snippet(model_id: str, stage: str) -> str:
    """Code that loads and runs this model with transformers (tests run it on the card's own model)."""
    if stage == "reward":
        return "\n".join([
            "import torch",
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
            "",
            f'model_id = "{model_id}"',
            "tokenizer = AutoTokenizer.from_pretrained(model_id)",
            "model = AutoModelForSequenceClassification.from_pretrained(model_id)",
            f'messages = [{{"role": "user", "content": "{USAGE_PROMPT}"}}, {{"role": "assistant", "content": "الرباط."}}]',
            'inputs = tokenizer.apply_chat_template(messages, return_dict=True, return_tensors="pt")',
            "with torch.no_grad():",
            "    print(model(**inputs).logits[0, 0].item())  # higher is preferred",
        ])
    if stage == "pretrain":
        prompt = 'inputs = tokenizer("عاصمة المغرب هي", return_tensors="pt").to(model.device)'
    else:
        prompt = "\n".join([
            f'messages = [{{"role": "user", "content": "{USAGE_PROMPT}"}}]',
            "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,",
            '                                       return_tensors="pt").to(model.device)',
        ])
    return "\n".join([
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model_id = "{model_id}"',
        "tokenizer = AutoTokenizer.from_pretrained(model_id)",
        'model = AutoModelForCausalLM.from_pretrained(model_id, dtype="auto")',
        prompt,
        "output = model.generate(**inputs, max_new_tokens=64)",
        'print(tokenizer.decode(output[0][inputs["input_ids"].shape[-1]:], skip_special_tokens=True))',
    ])


def eval_results(scores: dict[str, float], source: str, report_uri: str | None):
    """model-index entries for an EvalJob's "<suite>/<method>" scores."""
    from huggingface_hub import EvalResult

    results = []
    for key, value in sorted(scores.items()):
        suite, _, method = key.partition("/")
        dataset, name, metric = SUITES.get(suite, (suite, suite, "score"))
        results.append(EvalResult(task_type="text-generation", dataset_type=dataset, dataset_name=name,
                                  metric_type=metric, metric_value=float(value), metric_name=f"{metric} ({method or 'default'})",
                                  source_name=source if report_uri else None, source_url=report_uri))
    return results


def build_model_card(*, kind: str, stage: str, spec, spec_dict: dict, inputs: dict[str, str], base_uri: str,
                     base_dir: Path | None, job: str, output_uri: str | None, scores: dict[str, float] | None = None):
    """The final model's ModelCard; for an EvalJob, the evaluated model's card with model-index results."""
    from huggingface_hub import ModelCard, ModelCardData

    base = read_card(base_dir)
    base_data = base.data.to_dict() if base else {}
    version = code_version()
    when = time.strftime("%Y-%m-%d", time.gmtime())
    lineage = list((base_data.get("dhad") or {}).get("lineage") or [])
    output = getattr(spec, "output", None)
    if kind == "EvalJob":  # the evaluated model keeps its card; the job adds its scores
        data = base.data if base else ModelCardData(language=["ar"], library_name="transformers")
        data.model_name = data.model_name or Path(base_uri.rstrip("/")).name
        report = f"{output_uri}/report/summary.md" if output_uri else None
        new = eval_results(scores or {}, f"Dhad EvalJob {job}", report)
        seen = {(r.dataset_type, r.metric_name) for r in new}  # a re-evaluation replaces the old score
        data.eval_results = [r for r in (data.eval_results or []) if (r.dataset_type, r.metric_name) not in seen] + new
        title, this_stage = f"{data.model_name} (evaluated by Dhad)", (base_data.get("dhad") or {}).get("stage", "sft")
    else:
        this_stage = stage
        lineage.append({"job": job, "kind": kind, "stage": stage, "output": output_uri, "date": when,
                        "commit": version["commit"], "dhad": version["dhad"], "inputs": inputs})
        license_ = (output.license if output is not None else None) or base_data.get("license")
        inherited = {k: base_data[k] for k in ("license_name", "license_link") if k in base_data and license_ == base_data.get("license")}
        base_model = hub_id(base_uri) or base_data.get("base_model")
        hub = output.hub if output is not None else None
        data = ModelCardData(
            language=["ar"], library_name="transformers", license=license_, base_model=base_model,
            datasets=[d for d in (hub_id(u) for u in dataset_uris(spec)) if d] or None,
            pipeline_tag="text-classification" if stage == "reward" else "text-generation",
            tags=["dhad", "arabic", stage, kind], model_name=hub.repo_id.split("/")[-1] if hub else job.split("/")[-1],
            **inherited,
        )
        data.dhad = {"kind": kind, "stage": stage, "job": job, "output": output_uri, "lineage": lineage}
        title = f"{data.model_name}: Arabic {kind.removesuffix('Job')} ({stage}) by Dhad"
    hub = output.hub if output is not None and kind != "EvalJob" else None
    model_id = hub.repo_id if hub else "path/to/this/folder"
    results = [{"name": r.dataset_name, "method": (r.metric_name or "").partition("(")[2].rstrip(")"), "value": r.metric_value}
               for r in (data.eval_results or [])]
    summary = (f"{title.split(':')[0]} is {base_data.get('model_name') or base_uri} after the Dhad {stage} stage "
               f"(AceGPT's recipe for Arabic: continued pre-training, SFT on native Arabic instructions, RLAIF).")
    return ModelCard.from_template(
        data, template_str=TEMPLATE, title=title, summary=summary, usage=usage_snippet(model_id, this_stage),
        recipe=recipe(spec, stage) if kind != "EvalJob" else {"evaluation": ", ".join(s.value for s in spec.evaluation.suites)},
        data=dataset_uris(spec), results=results, lineage=lineage, base_uri=base_uri,
        base_model=data.base_model, inputs=json.dumps(inputs, indent=2, ensure_ascii=False), kind=kind,
        spec=json.dumps(spec_dict, indent=2, ensure_ascii=False),
    )


def write_model_card(model_dir: Path, **card) -> Path:
    """Writes build_model_card(**card) to model_dir/README.md."""
    path = Path(model_dir) / CARD
    build_model_card(**card).save(path)
    return path
