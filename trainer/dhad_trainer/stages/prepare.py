"""The prepare sub-stage of a PretrainJob: worker JOB_COMPLETION_INDEX of `data.workers`, one process
per pod, no torchrun and no GPU (stage_pods: StagePods(workers, 1, 0, gang=False)).

Its output is keyed, not owned: `<storage prefix>/prepared/<key>/`, the key a hash of the inputs'
identities (each file's URI, size and S3 ETag or local sha256; the benchmark files likewise), the
tokenizer files' content, the data settings (not the number of workers) and the vocabulary settings.
A restart, a second job or a re-applied manifest with the same inputs finds MANIFEST.json there and
prepares nothing. Worker 0 then writes `<job root>/prepare/prepared.json` naming the dataset, which
the pretrain sub-stage reads: training never prepares.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from dhad_api.jobs import Job, PretrainJobSpec
from dhad_api.layout import prepared_root, stage_uri
from dhad_trainer.data import prepare as pipeline
from dhad_trainer.data.readers import describe
from dhad_trainer.storage.routing import RoutingStore, open_store

log = logging.getLogger(__name__)

POINTER = "prepared.json"
# What a tokenizer is made of; config.json rides along (some tokenizers need its model_type) but
# does not change tokenization, so it is not hashed.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")


def pointer_uri(root: str) -> str:
    return f"{stage_uri(root, 'prepare')}/{POINTER}"


def fetch_tokenizer(uri: str, dest: Path, storage) -> Path:
    """Only the tokenizer files of a model folder (s3://, hf:// or a path), not its weights."""
    if uri.startswith("s3://"):
        store = open_store(uri, storage)
        base = uri.rstrip("/")
        names = [k[len(base) + 1 :] for k in store.list(base + "/")]
        wanted = [n for n in names if n in (*TOKENIZER_FILES, "config.json")]
        if not any(n in TOKENIZER_FILES for n in wanted):
            raise FileNotFoundError(f"{uri}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])})")
        store.download_dir(base, dest, wanted)
        return dest
    if uri.startswith("hf://"):
        from huggingface_hub import snapshot_download

        from dhad_trainer.storage.models import parse_hf

        repo, revision = parse_hf(uri)
        return Path(snapshot_download(repo_id=repo, revision=revision, local_dir=str(dest),
                                      token=os.environ.get("HF_TOKEN") or None,
                                      allow_patterns=[*TOKENIZER_FILES, "config.json"]))
    return Path(uri.removeprefix("file://"))


def tokenizer_identity(folder: Path) -> str:
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = folder / name
        if path.exists():
            h.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return "sha256:" + h.hexdigest()


def vocabulary_settings(spec: PretrainJobSpec, data_store) -> dict | None:
    v = spec.vocabulary
    if not v.new_tokens:
        return None
    out = {"new_tokens": v.new_tokens, "sample_bytes": int(v.sample_megabytes * 1024 * 1024), "corpus": v.corpus}
    if v.corpus:
        out["corpus_files"] = [[f.uri, f.size, f.identity] for f in describe(v.corpus, data_store)]
    return out


def dataset_key(plan: pipeline.Plan, tokenizer: str, vocabulary: dict | None) -> str:
    identity = {**plan.identity(), "tokenizer": tokenizer, "vocabulary": vocabulary}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:32]


def prepared_location(spec: PretrainJobSpec, root: str) -> str:
    """DHAD_PREPARED_ROOT (tests, local use), else beside the job outputs: the bucket's prepared/ for
    an s3:// root, <root>/prepared for a local folder."""
    if os.environ.get("DHAD_PREPARED_ROOT"):
        return os.environ["DHAD_PREPARED_ROOT"].rstrip("/")
    return prepared_root(spec.storage) if root.startswith("s3://") else f"{root.rstrip('/')}/prepared"


def run_pod(job: Job, root: str, index: int, workers: int, work_dir: Path, reporter=None) -> dict | None:
    """One prepare pod: plan, key, this worker's items; worker 0 publishes the pointer."""
    spec: PretrainJobSpec = job.typed_spec()
    data_store = RoutingStore(spec.storage)
    tokenizer_uri = spec.model.tokenizer or job.resolved.model_uri or spec.model.uri
    tok_dir = fetch_tokenizer(tokenizer_uri, work_dir / "tokenizer", spec.storage)
    plan = pipeline.Plan.make(spec.data, data_store)
    vocabulary = vocabulary_settings(spec, data_store)
    key = dataset_key(plan, tokenizer_identity(tok_dir), vocabulary)
    location = f"{prepared_location(spec, root)}/{key}"
    store = open_store(location, spec.storage)
    log.info("prepare worker %d/%d: %d pieces, dataset %s", index, workers, len(plan.pieces), location)
    total = pipeline.total_items(plan, vocabulary is not None)
    done = {"n": 0}

    def progress(stage: str, item: int) -> None:
        done["n"] += 1
        if reporter:
            reporter.update(step=done["n"], totalSteps=total, phase=stage)

    scratch = work_dir / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    ctx = pipeline.Context(plan, location, store, data_store, tok_dir, scratch, vocabulary, on_item=progress)
    stats = pipeline.run_worker(ctx, index, workers, pipeline.load_tokenizer)
    if index == 0 and stats is not None:
        body = {"uri": location, "key": key, "tokens": stats["tokens"], "blocks": stats["blocks"]}
        open_store(root, spec.storage).put_bytes(pointer_uri(root), json.dumps(body).encode())
        log.info("prepared data: %s", json.dumps({k: stats[k] for k in ("documents_in", "kept", "tokens", "blocks")}))
    return stats
