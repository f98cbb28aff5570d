"""Checkpoint publishing, listing, retention and fetching on a real S3 server, including two nodes
publishing concurrently and the S3 server dying in the middle of an upload."""

from __future__ import annotations

import json
import os
import threading
import uuid

import pytest

from dhad_trainer.storage.checkpoints import AsyncPublisher, CheckpointStore
from dhad_trainer.storage.local import LocalStore
from dhad_trainer.storage.routing import open_store
from tests.harness.s3 import S3Server

pytestmark = pytest.mark.s3


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)


def hf_checkpoint(folder, rank_files=(0,), model_bytes=2000):
    """What HF Trainer leaves in checkpoint-N on one node: shared files on node 0, per-rank files on all."""
    folder.mkdir(parents=True)
    if 0 in rank_files:
        (folder / "model.safetensors").write_bytes(os.urandom(model_bytes))
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    for rank in rank_files:
        (folder / f"rng_state_{rank}.pth").write_bytes(os.urandom(64))
    return folder


class ThreadExchange:
    """An all-gather between threads: the same contract as the node leaders' gloo all-gather."""

    def __init__(self, parties: int) -> None:
        self.barrier = threading.Barrier(parties, timeout=60)
        self.values: dict[int, object] = {}

    def for_node(self, node: int):
        def exchange(value):
            self.values[node] = value
            self.barrier.wait()
            out = [self.values[i] for i in sorted(self.values)]
            self.barrier.wait()
            return out

        return exchange


def test_publish_manifest_last_retention_and_latest(s3_env, s3_prefix, tmp_path):
    store = open_store(s3_prefix)
    ckpts = CheckpointStore(store, f"{s3_prefix}/pretrain/checkpoints")
    for step in (2, 4, 6):
        uri = ckpts.publish(hf_checkpoint(tmp_path / f"c{step}"), step, is_global_zero=True, keep_last=2)
        assert uri == f"{s3_prefix}/pretrain/checkpoints/step-{step:06d}"
    assert ckpts.steps() == ([4, 6], [])  # step 2 pruned
    manifest = json.loads(store.get_bytes(f"{ckpts.step_uri(6)}/MANIFEST.json"))
    assert manifest["step"] == 6 and {f["path"] for f in manifest["files"]} == {
        "node-0/model.safetensors", "node-0/trainer_state.json", "node-0/rng_state_0.pth"}
    # A half-written checkpoint (no manifest) does not exist, and the next prune removes it.
    store.upload_dir(hf_checkpoint(tmp_path / "c8"), f"{ckpts.step_uri(8)}/node-0")
    assert ckpts.latest_complete() == 6 and ckpts.steps() == ([4, 6], [8])
    ckpts.prune(keep_last=1)
    assert ckpts.steps() == ([6], [])


def test_two_nodes_publish_and_fetch_merges_their_files(s3_env, s3_prefix, tmp_path):
    store = open_store(s3_prefix)
    exchange = ThreadExchange(2)
    nodes = [CheckpointStore(store, f"{s3_prefix}/ck", n, 2, exchange.for_node(n)) for n in (0, 1)]
    folders = [hf_checkpoint(tmp_path / "n0", (0, 1)), hf_checkpoint(tmp_path / "n1", (2, 3))]
    results = [None, None]
    threads = [threading.Thread(target=lambda n=n: results.__setitem__(n, nodes[n].publish(folders[n], 10, n == 0)))
               for n in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] == results[1] == nodes[0].step_uri(10)
    paths = {f["path"] for f in json.loads(store.get_bytes(f"{results[0]}/MANIFEST.json"))["files"]}
    assert {"node-0/rng_state_1.pth", "node-1/rng_state_2.pth", "node-1/rng_state_3.pth"} <= paths
    got = nodes[1].fetch(results[0], tmp_path / "resume" / "checkpoint-10")
    names = sorted(p.name for p in got.iterdir())
    assert names == ["model.safetensors", "rng_state_0.pth", "rng_state_1.pth", "rng_state_2.pth",
                     "rng_state_3.pth", "trainer_state.json"]
    assert (got / "rng_state_2.pth").read_bytes() == (folders[1] / "rng_state_2.pth").read_bytes()


def test_a_failed_node_means_no_manifest(tmp_path):
    store = LocalStore()
    exchange = ThreadExchange(2)

    def boom(entry):
        raise OSError("disk on fire")

    nodes = [CheckpointStore(store, str(tmp_path / "ck"), 0, 2, exchange.for_node(0)),
             CheckpointStore(store, str(tmp_path / "ck"), 1, 2, exchange.for_node(1), on_file=boom)]
    results = [None, None]
    threads = [threading.Thread(target=lambda n=n: results.__setitem__(
        n, nodes[n].publish(hf_checkpoint(tmp_path / f"n{n}", (n,)), 2, n == 0))) for n in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [None, None] and nodes[0].steps() == ([], [2])


def test_fetch_rejects_a_corrupted_file(tmp_path):
    store = LocalStore()
    ckpts = CheckpointStore(store, str(tmp_path / "ck"))
    uri = ckpts.publish(hf_checkpoint(tmp_path / "c"), 2, True)
    (tmp_path / "ck" / "step-000002" / "node-0" / "model.safetensors").write_bytes(b"x" * 2000)
    with pytest.raises(OSError, match="sha256"):
        ckpts.fetch(uri, tmp_path / "out" / "checkpoint-2")


def test_s3_stopped_during_upload_leaves_previous_checkpoint_newest(tmp_path, monkeypatch):
    """A private SeaweedFS is stopped after the first file of step 4; after a restart on the same data,
    step 2 is still the newest complete checkpoint and can be fetched."""
    server = S3Server(tmp_path / "s3").start()
    try:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        bucket = "ck-" + uuid.uuid4().hex[:8]
        server.client().make_bucket(bucket)
        root = f"s3://{bucket}/job/pretrain/checkpoints"
        stopped = []

        def stop_after_first_file(entry):
            if not stopped:
                stopped.append(entry.path)
                server.stop(grace=0.2)  # SeaweedFS ignores SIGTERM: kill it now

        store = open_store(root)
        ckpts = CheckpointStore(store, root, on_file=stop_after_first_file)
        publisher = AsyncPublisher(ckpts, tmp_path / "staging", True, keep_last=3)
        ckpts.on_file = None
        publisher.start(hf_checkpoint(tmp_path / "checkpoint-2"), 2)
        publisher.wait()
        assert publisher.last_uri == ckpts.step_uri(2)
        ckpts.on_file = stop_after_first_file
        publisher.start(hf_checkpoint(tmp_path / "checkpoint-4", model_bytes=3_000_000), 4)
        publisher.wait()  # the upload thread fails and logs; training would go on
        assert stopped and publisher.last_uri == ckpts.step_uri(2)
        assert not (tmp_path / "staging" / "step-000004").exists()
    finally:
        server.stop()
    restarted = S3Server(tmp_path / "s3", access_key=server.access_key, secret_key=server.secret_key).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", restarted.url)
        ckpts = CheckpointStore(open_store(root), root)
        assert ckpts.latest_complete() == 2
        assert not ckpts.store.exists(f"{ckpts.step_uri(4)}/MANIFEST.json")
        got = ckpts.fetch(ckpts.step_uri(2), tmp_path / "resume" / "checkpoint-2")
        assert (got / "trainer_state.json").exists()
    finally:
        restarted.stop()


def test_resume_prefers_own_checkpoints_then_resume_from(tmp_path):
    from dhad_api.jobs import PretrainJobSpec
    from dhad_trainer.runtime.worker import choose_resume, fetch_checkpoint

    store = LocalStore()
    other = CheckpointStore(store, str(tmp_path / "failed-job" / "pretrain" / "checkpoints"))
    other_uri = other.publish(hf_checkpoint(tmp_path / "o"), 200, True)
    doc = {"model": {"uri": "/m"}, "storage": {"bucket": "bkt"}, "data": {"sources": [{"uri": "/d"}]},
           "checkpoint": {"resumeFrom": "s3://bkt/failed-job/pretrain/checkpoints/step-000200"}}
    spec = PretrainJobSpec.model_validate(doc)
    spec.checkpoint = spec.checkpoint.model_copy(update={"resume_from": other_uri})  # a folder stands in for S3
    own = CheckpointStore(store, str(tmp_path / "this-job" / "pretrain" / "checkpoints"))
    assert choose_resume(spec, own) == other_uri  # nothing of our own yet: the explicit checkpoint
    got = fetch_checkpoint(other_uri, own, spec, tmp_path / "trainer" / "checkpoint-200")
    assert (got / "trainer_state.json").exists()
    own.publish(hf_checkpoint(tmp_path / "mine"), 210, True)
    assert choose_resume(spec, own) == own.step_uri(210)  # a restarted attempt continues its own run
    never = PretrainJobSpec.model_validate({**doc, "checkpoint": {"resume": "never"}})
    assert choose_resume(never, own) is None
