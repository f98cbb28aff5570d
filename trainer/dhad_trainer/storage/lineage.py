"""Lineage: every output model says which chain of jobs produced it, back to the first base model.

`lineage.json` sits in the model folder beside the weights and the card. It holds the whole chain: the
base model's chain (read from its own lineage.json, when it has one) plus one entry for this job: the
job and, in a pipeline, the pipeline and stage; the resolved spec's hash (the pipeline's cache key);
image and code version; the base model's URI and sha256; the data URIs and content hashes; and the
evaluation scores known when it was written. An EvalJob writes its scores beside the model it
evaluated (`evaluations_uri`), so scores that come later (a pipeline's gate) are found too:
`dhad lineage MODEL_URI` prints the chain and every evaluation of each model in it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from dhad_api.pipeline import CACHE_KEY_ENV, PIPELINE_ENV, PIPELINE_STAGE_ENV
from dhad_trainer.storage.routing import open_store

log = logging.getLogger(__name__)

LINEAGE = "lineage.json"
VERSION = 1


def evaluations_uri(model_uri: str) -> str:
    """Where evaluations of `model_uri` are recorded: `<parent>/evaluations/<name>/`, beside the model
    and outside its folder, so downloading the model never picks them up."""
    parent, _, name = model_uri.rstrip("/").rpartition("/")
    return f"{parent}/evaluations/{name}"


def spec_hash(job) -> str:
    """The pipeline's cache key when the job is a pipeline stage, else sha256 of the spec and what was resolved."""
    key = os.environ.get(CACHE_KEY_ENV)
    if key:
        return key
    document = {"kind": job.kind.value, "spec": job.spec, "resolved": job.resolved.to_json_dict()}
    return hashlib.sha256(json.dumps(document, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def data_uris(spec) -> list[str]:
    """Every dataset a typed spec reads (the card's list), and an evaluation's benchmark and reference files."""
    from dhad_trainer.storage.models import dataset_uris

    evaluation = getattr(spec, "evaluation", None)
    extra = [u for u in (evaluation.benchmarks, evaluation.reference_answers) if u] if evaluation is not None else []
    return list(dict.fromkeys(dataset_uris(spec) + extra))


def read_lineage(model: str | Path, storage=None) -> dict | None:
    """The lineage.json of a model folder or URI, or None when it has none (a Hub or hand-made model)."""
    uri = str(model).rstrip("/") + "/" + LINEAGE
    try:
        store = open_store(uri, storage)
        if not store.exists(uri):
            return None
        return json.loads(store.get_bytes(uri))
    except (OSError, ValueError) as error:
        log.warning("cannot read the lineage of %s: %s", model, error)
        return None


def read_evaluations(model_uri: str, storage=None) -> list[dict]:
    """Every evaluation recorded beside `model_uri`, oldest first."""
    prefix = evaluations_uri(model_uri)
    try:
        store = open_store(prefix, storage)
        records = [json.loads(store.get_bytes(uri)) for uri in store.list(prefix + "/") if uri.endswith(".json")]
    except Exception as error:  # noqa: BLE001 - a missing or unreadable record must not fail a job
        log.info("no evaluations of %s: %s", model_uri, error)
        return []
    return sorted(records, key=lambda r: r.get("time", 0))


def _job(job) -> dict:
    meta = job.metadata
    entry = {"job": f"{meta.namespace}/{meta.name}", "kind": job.kind.value, "uid": meta.uid}
    if os.environ.get(PIPELINE_ENV):
        entry["pipeline"] = f"{meta.namespace}/{os.environ[PIPELINE_ENV]}"
        entry["pipelineStage"] = os.environ.get(PIPELINE_STAGE_ENV)
    return entry


def build(job, spec, stage: str, *, output_uri: str, base_uri: str, base_dir: Path | None, inputs: dict[str, str],
          code: dict, storage=None) -> dict:
    """This model's lineage: the base model's chain (or a root entry for it) plus this job's entry."""
    base = read_lineage(base_dir, storage) if base_dir is not None else None
    chain = list((base or {}).get("chain") or [])
    if not chain:
        chain = [{"model": base_uri, "root": True, **({"sha256": inputs["model"]} if "model" in inputs else {})}]
    evaluations = read_evaluations(base_uri, storage) if base_uri.startswith(("s3://", "/")) else []
    if evaluations:
        chain[-1] = {**chain[-1], "evaluations": evaluations}
    chain.append({
        **_job(job), "stage": stage, "model": output_uri, "specHash": spec_hash(job), "image": spec.image,
        "code": code, "baseModel": base_uri, "baseModelSha256": inputs.get("model"), "data": data_uris(spec),
        "inputsSha256": {k: v for k, v in inputs.items() if k != "model"}, "time": time.time(),
    })
    return {"version": VERSION, "model": output_uri, "chain": chain}


def write(model_dir: Path, lineage: dict) -> Path:
    path = Path(model_dir) / LINEAGE
    path.write_text(json.dumps(lineage, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def record_evaluation(job, model_uri: str, scores: dict[str, float], report: str | None, settings: dict, storage=None) -> str | None:
    """Writes this EvalJob's scores beside the model it evaluated; returns where, or None (Hub models, or a
    store this job may not write: the scores stay in the job's status and report)."""
    if not model_uri.startswith(("s3://", "/")):
        return None
    meta = job.metadata
    uri = f"{evaluations_uri(model_uri)}/{meta.namespace}-{meta.name}-{meta.uid[:8]}.json"
    record = {**_job(job), "scores": scores, "report": report, "evaluation": settings, "specHash": spec_hash(job), "time": time.time()}
    try:
        open_store(uri, storage).put_bytes(uri, json.dumps(record, ensure_ascii=False, indent=2).encode())
    except Exception as error:  # noqa: BLE001 - recording is a courtesy; the evaluation itself succeeded
        log.warning("cannot record the evaluation beside %s: %s", model_uri, error)
        return None
    return uri


def describe(lineage: dict, live: dict[str, list[dict]] | None = None) -> str:
    """The chain as text, first base model first; `live` adds evaluations found now, by model URI."""
    lines = []
    for index, entry in enumerate(lineage.get("chain") or []):
        evaluations = {json.dumps(e, sort_keys=True): e for e in (entry.get("evaluations") or []) + ((live or {}).get(entry.get("model")) or [])}
        if entry.get("root"):
            lines.append(f"{index}. base model {entry['model']}" + (f" (sha256 {entry['sha256'][:16]})" if entry.get("sha256") else ""))
        else:
            where = f"pipeline {entry['pipeline']} stage {entry.get('pipelineStage')}, " if entry.get("pipeline") else ""
            code = entry.get("code") or {}
            lines += [
                f"{index}. {entry['model']}",
                f"   made by {where}{entry['kind']} {entry['job']} ({entry['stage']}) from {entry['baseModel']}",
                f"   spec hash {entry.get('specHash')}; image {entry.get('image') or 'the operator default'}; "
                f"dhad {code.get('dhad')} commit {code.get('commit') or 'unknown'}",
            ]
            if entry.get("data"):
                lines.append(f"   data {', '.join(entry['data'])}")
            hashes = {"base model": entry.get("baseModelSha256"), **(entry.get("inputsSha256") or {})}
            lines.append("   sha256 " + ", ".join(f"{k} {v[:16]}" for k, v in hashes.items() if v))
        for record in evaluations.values():
            scores = ", ".join(f"{k} {v:.4f}" for k, v in sorted((record.get("scores") or {}).items()))
            by = f"pipeline {record['pipeline']} stage {record.get('pipelineStage')}, " if record.get("pipeline") else ""
            lines.append(f"   evaluated by {by}{record.get('job')}: {scores or 'no scores'}")
    return "\n".join(lines)
