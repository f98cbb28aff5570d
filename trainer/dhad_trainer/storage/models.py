"""Models in and out: resolve a model reference to a local folder; write the final model with a card.

A reference is `s3://bucket/prefix` (a Hugging Face folder, downloaded), `hf://org/name[@revision]`
(`huggingface_hub.snapshot_download`), or a local path / `file://` path (used in place). The card
(README.md) records what is needed to reproduce the model: the job spec, the code version and the
sha256 of every input, so a model found in a bucket months later explains itself.
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


def write_model_card(model_dir: Path, *, kind: str, stage: str, spec: dict, inputs: dict[str, str],
                     metrics: dict | None = None, base_model: str | None = None) -> Path:
    """README.md with YAML front matter (what the Hub reads) and the provenance as JSON blocks."""
    version = code_version()
    front = ["---", "library_name: transformers", "language:", "- ar", "tags:", "- dhad", f"- {stage}"]
    if base_model:
        front.append(f"base_model: {json.dumps(base_model)}")
    front.append("---")
    body = [
        f"# Dhad {kind} / {stage}",
        "",
        f"Trained by Dhad {version['dhad']} (commit {version['commit'] or 'unknown'}) on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "## Inputs (sha256)",
        "",
        "```json",
        json.dumps(inputs, indent=2, ensure_ascii=False),
        "```",
        "",
        "## Metrics",
        "",
        "```json",
        json.dumps(metrics or {}, indent=2, ensure_ascii=False, default=str),
        "```",
        "",
        "## Job spec",
        "",
        "```json",
        json.dumps(spec, indent=2, ensure_ascii=False),
        "```",
        "",
        "## Code version",
        "",
        "```json",
        json.dumps(version, indent=2),
        "```",
        "",
    ]
    card = Path(model_dir) / "README.md"
    card.write_text("\n".join(front + body), encoding="utf-8")
    return card
