"""Checkpoints in the object store: `<root>/<stage>/checkpoints/step-000200/node-<i>/...` + MANIFEST.json.

Every node uploads the files its own processes wrote (HF Trainer writes model/optimizer/state on rank 0
and per-rank RNG state and ZeRO shards on every rank) under `node-<i>/`, so nodes never write the same
key. Then the node leaders meet in `exchange` (a barrier that also gathers each node's file list, or
None for a node whose upload failed) and rank 0 writes MANIFEST.json, last. A checkpoint without a
manifest does not exist: readers ignore it and retention deletes it. Resuming downloads every node's
files and overlays them, node 0 first and the reader's own node last, into one HF `checkpoint-N` folder
(what a shared filesystem would have held).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from dhad_api.layout import MANIFEST, checkpoint_name
from dhad_trainer.storage.base import FileEntry

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d+)$")
Exchange = Callable[[object], list]  # all-gather among node leaders; also the barrier


def single_node_exchange(value: object) -> list:
    """The exchange of a one-node job: nothing to wait for."""
    return [value]


class CheckpointStore:
    """Publishes, lists, fetches and prunes the checkpoints under one `.../checkpoints` URI."""

    def __init__(self, store, uri: str, node_rank: int = 0, nnodes: int = 1, exchange: Exchange = single_node_exchange,
                 on_file: Callable[[FileEntry], None] | None = None) -> None:
        self.store, self.uri = store, uri.rstrip("/")
        self.node_rank, self.nnodes, self.exchange = node_rank, nnodes, exchange
        self.on_file = on_file  # called after each uploaded file (progress, tests)

    def step_uri(self, step: int) -> str:
        return f"{self.uri}/{checkpoint_name(step)}"

    def publish(self, folder: Path, step: int, is_global_zero: bool, keep_last: int | None = None) -> str | None:
        """Uploads this node's files and, on rank 0 once every node succeeded, writes the manifest.

        Every node leader must call it for the same step (it meets the others in `exchange`). Returns
        the checkpoint URI when it is complete, else None; upload errors are logged, not raised, so a
        storage hiccup costs one checkpoint rather than the training run.
        """
        node_uri = f"{self.step_uri(step)}/node-{self.node_rank}"
        entries = None
        try:
            self.store.delete_prefix(node_uri)  # leftovers of a failed attempt at this step
            files = self.store.upload_dir(folder, node_uri, self.on_file)
            entries = [asdict(FileEntry(f"node-{self.node_rank}/{e.path}", e.size, e.sha256)) for e in files]
        except Exception as error:  # noqa: BLE001 - reported through the exchange
            log.warning("checkpoint %s: upload from node %d failed: %s", checkpoint_name(step), self.node_rank, error)
        everyone = self.exchange(entries)
        if any(e is None for e in everyone):
            log.warning("checkpoint %s: incomplete (a node failed to upload); no manifest written", checkpoint_name(step))
            return None
        if not is_global_zero:
            return self.step_uri(step)
        manifest = {"step": step, "nodes": self.nnodes, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "files": sorted((f for node in everyone for f in node), key=lambda f: f["path"])}
        try:
            self.store.put_bytes(f"{self.step_uri(step)}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
        except Exception as error:  # noqa: BLE001
            log.warning("checkpoint %s: manifest write failed: %s", checkpoint_name(step), error)
            return None
        log.info("checkpoint %s complete: %d files, %d bytes", self.step_uri(step), len(manifest["files"]),
                 sum(f["size"] for f in manifest["files"]))
        if keep_last:
            self.prune(keep_last, current=step)
        return self.step_uri(step)

    def steps(self) -> tuple[list[int], list[int]]:
        """(complete steps, incomplete steps), each ascending."""
        complete, partial = [], []
        for name in self.store.list_dirs(self.uri):
            if m := STEP_DIR.match(name):
                step = int(m.group(1))
                if self.store.exists(f"{self.uri}/{name}/{MANIFEST}"):
                    complete.append(step)
                elif self.store.list(f"{self.uri}/{name}/"):  # some stores keep emptied "folders"
                    partial.append(step)
        return sorted(complete), sorted(partial)

    def latest_complete(self) -> int | None:
        complete, _ = self.steps()
        return complete[-1] if complete else None

    def prune(self, keep_last: int, current: int | None = None) -> None:
        """Keeps the newest `keep_last` complete checkpoints; deletes older ones (manifest first, so a
        half-deleted one is never taken for complete) and every manifest-less one except `current`."""
        complete, partial = self.steps()
        doomed = complete[:-keep_last] + [s for s in partial if s != current]
        for step in doomed:
            try:
                self.store.delete(f"{self.step_uri(step)}/{MANIFEST}")
                self.store.delete_prefix(self.step_uri(step))
            except Exception as error:  # noqa: BLE001 - retried at the next save
                log.warning("could not delete %s: %s", self.step_uri(step), error)

    def fetch(self, checkpoint_uri: str, dest: Path, verify: bool = True) -> Path:
        """Downloads a complete checkpoint into `dest` as one folder (node 0 first, own node last)."""
        manifest = json.loads(self.store.get_bytes(f"{checkpoint_uri.rstrip('/')}/{MANIFEST}"))
        staging = dest.with_name(dest.name + ".download")
        shutil.rmtree(staging, ignore_errors=True)
        got = {e.path: e for e in self.store.download_dir(checkpoint_uri, staging, [f["path"] for f in manifest["files"]])}
        for f in manifest["files"]:
            e = got[f["path"]]
            if e.size != f["size"] or (verify and e.sha256 != f["sha256"]):
                raise OSError(f"{checkpoint_uri}/{f['path']}: size or sha256 differs from the manifest")
        nodes = sorted({int(p.name.split("-")[1]) for p in staging.glob("node-*")})
        order = [n for n in nodes if n != self.node_rank] + ([self.node_rank] if self.node_rank in nodes else [])
        shutil.rmtree(dest, ignore_errors=True)
        for node in order:
            shutil.copytree(staging / f"node-{node}", dest, dirs_exist_ok=True, copy_function=_move)
        shutil.rmtree(staging, ignore_errors=True)
        return dest


def _move(src: str, dst: str) -> None:
    os.replace(src, dst)


def stage_hardlinks(src: Path, dest: Path) -> Path:
    """A frozen copy of `src` made of hard links (free on one filesystem), so HF Trainer may rotate or
    delete its checkpoint folder while the upload still reads the files."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dest, copy_function=link)
    return dest


class AsyncPublisher:
    """Publishes one checkpoint at a time in a background thread; `wait()` before the next and at exit."""

    def __init__(self, checkpoints: CheckpointStore, staging_dir: Path, is_global_zero: bool, keep_last: int,
                 on_complete: Callable[[str, int], None] | None = None) -> None:
        self.checkpoints, self.staging_dir = checkpoints, staging_dir
        self.is_global_zero, self.keep_last, self.on_complete = is_global_zero, keep_last, on_complete
        self._thread: threading.Thread | None = None
        self.last_uri: str | None = None

    def start(self, folder: Path, step: int) -> None:
        self.wait()
        staged = stage_hardlinks(folder, self.staging_dir / checkpoint_name(step))
        self._thread = threading.Thread(target=self._run, args=(staged, step), name=f"upload-{step}", daemon=True)
        self._thread.start()

    def _run(self, staged: Path, step: int) -> None:
        try:
            uri = self.checkpoints.publish(staged, step, self.is_global_zero, self.keep_last)
            if uri:
                self.last_uri = uri
                if self.on_complete:
                    self.on_complete(uri, step)
        except Exception:  # noqa: BLE001 - a failed exchange must not kill training from a thread
            log.exception("checkpoint step %d: publishing failed", step)
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
