"""Where a job's outputs live in the object store; the operator and the trainer both derive URIs here.

`s3://<bucket>/<prefix>/<namespace>/<name>-<uid>/<stage>/...`: keyed by the object's UID, so a deleted
and re-created job never resumes someone else's run (`checkpoint.resumeFrom` resumes on purpose).
"""

from __future__ import annotations

from dhad_api.common import Storage

CHECKPOINTS = "checkpoints"
MODEL = "model"
REPORT = "report"
TENSORBOARD = "tensorboard"  # <root>/tensorboard/<stage>/: one run per sub-stage under one logdir
MANIFEST = "MANIFEST.json"  # written last: a checkpoint without it does not exist


def output_root(storage: Storage, namespace: str, name: str, uid: str) -> str:
    prefix = storage.prefix.strip("/")
    parts = [p for p in (prefix, namespace, f"{name}-{uid}") if p]
    return f"s3://{storage.bucket}/" + "/".join(parts)


def stage_uri(root: str, stage: str) -> str:
    return f"{root.rstrip('/')}/{stage}"


def checkpoints_uri(root: str, stage: str) -> str:
    return f"{stage_uri(root, stage)}/{CHECKPOINTS}"


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def model_uri(root: str, stage: str) -> str:
    return f"{stage_uri(root, stage)}/{MODEL}"


def tensorboard_uri(root: str, stage: str | None = None) -> str:
    """Where TensorBoard event files go: `tensorboard --logdir <root>/tensorboard` shows every sub-stage."""
    base = f"{root.rstrip('/')}/{TENSORBOARD}"
    return f"{base}/{stage}" if stage else base


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/key/prefix` -> (bucket, "key/prefix")."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key.strip("/")


PREPARED = "prepared"


def prepared_root(storage: Storage) -> str:
    """Where prepared datasets live, shared by every job writing to this bucket and prefix: each under
    `<root>/<key>`, the key derived from the inputs' identities, the tokenizer and the data settings."""
    prefix = storage.prefix.strip("/")
    return f"s3://{storage.bucket}/" + "/".join(p for p in (prefix, PREPARED) if p)
