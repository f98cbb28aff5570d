"""Local mode for a Pipeline: the operator's decisions (dhad_api.pipeline.walk), with each child job run on
this machine by `run_job` as it is asked for.

The step cache is a folder of JSON entries in the work directory (`pipeline-cache/<key>.json`), next to
the embedded store that holds the outputs, so running the same manifest again in the same --workdir
reuses every unchanged stage. A child's UID is derived from its name (which carries its cache key), so a
failed stage run again continues from its own newest checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pydantic import ValidationError

from dhad_api.pipeline import CacheEntry, ChildReport, parse_pipeline, walk
from dhad_api.status import State
from dhad_trainer.local.run import LocalRunError, Session, run_job


class LocalCache:
    """Cache entries as files: one JSON object per key."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def entries(self) -> dict[str, CacheEntry]:
        found = {}
        for path in self.folder.glob("*.json"):
            entry = CacheEntry.from_dict(json.loads(path.read_text(encoding="utf-8")))
            if entry is not None:
                found[entry.key] = entry
        return found

    def put(self, entry: CacheEntry) -> None:
        (self.folder / f"{entry.key}.json").write_text(json.dumps(entry.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8")


def trainer_version() -> str:
    """What identifies the trainer in local cache keys: this checkout's package version and commit."""
    from dhad_trainer.storage.models import code_version

    version = code_version()
    return f"local:{version['dhad']}:{version['commit'] or 'unknown'}"


def _stamp(moment: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))


def run_pipeline(doc: dict, session: Session, trainer: str | None = None) -> dict:
    """Runs a Pipeline manifest's stages in order (gates included); returns the status the operator would write."""
    name = doc["metadata"]["name"]
    try:
        spec = parse_pipeline(doc["spec"])
    except ValidationError as error:
        raise LocalRunError(f"Pipeline {name}: {error}") from None
    cache = LocalCache(session.workdir / "pipeline-cache")
    trainer = trainer or trainer_version()
    children: dict[str, ChildReport] = {}
    while True:
        result = walk(name, spec, children, cache.entries(), trainer)
        for entry in result.cache_writes:
            cache.put(entry)
        if result.outcome != State.RUNNING:
            break
        pending = [s for s in result.steps if s.name not in children]
        if not pending:
            raise LocalRunError(f"Pipeline {name}: nothing left to run at stage {result.current}")
        for step in pending:
            what = {"stage": "", "gate": " gate", "base": " gate baseline (the stage's input model)"}[step.role]
            print(f"== stage {step.stage}{what}: {step.kind.value} {step.name}", flush=True)
            child = {"apiVersion": doc.get("apiVersion", "dhad.dev/v1alpha1"), "kind": step.kind.value,
                     "metadata": {"name": step.name}, "spec": step.spec}
            began = time.time()
            try:
                status = run_job(child, session)
                children[step.name] = ChildReport(state=State.SUCCEEDED.value, output_model=status.get("outputModel"),
                                                  scores=status.get("scores") or {}, report=status.get("report"), start_time=_stamp(began),
                                                  completion_time=_stamp(time.time()))
            except LocalRunError as error:
                children[step.name] = ChildReport(state=State.FAILED.value, reason="Failed", message=str(error),
                                                  start_time=_stamp(began), completion_time=_stamp(time.time()))
    for stage in result.stages:
        gate = stage.get("gate") or {}
        how = "from the cache" if stage.get("cached") else f"{stage.get('durationSeconds', '?')} s"
        line = f"   {stage['name']}: {stage['state']} ({how})" + (f", gate {gate['state']}: {gate.get('message')}" if gate else "")
        print(line, flush=True)
    status = {"state": result.outcome.value, "stages": result.stages}
    if result.output_model:
        status["outputModel"] = result.output_model
    if result.outcome == State.FAILED:
        status.update(reason=result.reason, message=result.message)
    return status
