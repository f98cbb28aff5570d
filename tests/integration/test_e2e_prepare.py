"""The prepare sub-stage on the real control plane, its pods run by the test node agent: a PretrainJob
with `prepareOnly` and 3 workers prepares exactly the blocks a 1-worker job prepares from the same
input (every token of every block, every count), and a worker pod deleted mid-way is retried alone
by its Indexed Job (backoffLimitPerIndex) and redoes none of the items any worker had finished."""

from __future__ import annotations

import base64
import json

import pytest
import yaml
from kubernetes import client

from dhad_api.layout import split_s3
from dhad_trainer.data.prepare import PASSES_FILE, STATS_FILE, iter_blocks
from dhad_trainer.local.tiny import init_tiny_model
from dhad_trainer.storage.s3 import S3Store
from tests.conftest import wait_for
from tests.harness.controlplane import kubectl
from tests.harness.node_agent import ON_AGENT, node_agent  # noqa: F401 - the fixture
from tests.integration.jobs import REPO, get, wait_state
from tests.support.arabic_corpus import documents, write_jsonl

pytestmark = [pytest.mark.cluster, pytest.mark.s3]


def _manifest(name: str, namespace: str, s3_server, bucket: str, workers: int, prepared: str) -> dict:
    doc = yaml.safe_load((REPO / "examples" / "tiny" / "pretrain.yaml").read_text())
    doc["metadata"] = {"name": name}
    spec = doc["spec"]
    base = f"s3://{bucket}/{namespace}"
    spec["model"] = {"uri": f"{base}/models/tiny-base", "dtype": "float32"}
    spec["prepareOnly"] = True
    spec["data"] = {"sources": [{"uri": f"{base}/data/web", "name": "web"}, {"uri": f"{base}/data/news.jsonl", "name": "news"}],
                    "filters": {"minChars": 20}, "workers": workers, "splitMegabytes": 0.004,
                    "packing": {"sequenceLength": 64, "blocksPerShard": 16}}
    spec.pop("vocabulary", None)
    spec["storage"] = {"endpoint": s3_server.url, "bucket": bucket, "prefix": namespace, "secretRef": {"name": "dhad-s3"}}
    spec["resources"] = {"nodes": 1, "gpusPerNode": 0, "sharedMemory": "64Mi"}
    spec["restartPolicy"] = {"maxRestarts": 2, "backoffSeconds": 1}
    spec["env"] = [{"name": "DHAD_PROGRESS_INTERVAL", "value": "1"}, {"name": "DHAD_PREPARED_ROOT", "value": prepared}]
    spec["podTemplate"] = ON_AGENT
    return doc


def _apply(control_plane, namespace: str, doc: dict, tmp_path) -> None:
    path = tmp_path / f"{doc['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    assert "created" in kubectl(control_plane, "apply", "-n", namespace, "-f", str(path)).stdout


def _pointer(store: S3Store, status: dict) -> dict:
    output = next(s["output"] for s in status["stages"] if s["name"] == "prepare")
    return json.loads(store.get_bytes(f"{output}/prepared.json"))


def test_three_worker_pods_prepare_what_one_does_and_a_deleted_worker_is_retried_alone(
        kube, namespace, control_plane, dhad_operator, node_agent, s3_server, s3_bucket, tmp_path, monkeypatch):  # noqa: F811
    core = client.CoreV1Api(kube)
    core.create_namespaced_secret(namespace, client.V1Secret(metadata=client.V1ObjectMeta(name="dhad-s3"), data={
        "AWS_ACCESS_KEY_ID": base64.b64encode(s3_server.access_key.encode()).decode(),
        "AWS_SECRET_ACCESS_KEY": base64.b64encode(s3_server.secret_key.encode()).decode()}))
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    store = S3Store(bucket=s3_bucket)
    base = f"s3://{s3_bucket}/{namespace}"
    store.upload_dir(init_tiny_model(tmp_path / "tiny-base"), f"{base}/models/tiny-base")
    docs, _ = documents(600, seed=11)
    for name, part in (("web/a.jsonl", docs[:200]), ("web/b.jsonl", docs[200:400]), ("news.jsonl", docs[400:])):
        store.upload_file(write_jsonl(tmp_path / name, part), f"{base}/data/{name}")

    three_root = f"{base}/prepared-three"
    _apply(control_plane, namespace, _manifest("prep-three", namespace, s3_server, s3_bucket, 3, three_root), tmp_path)

    def worker_one_finished_an_item():
        keys = [k for k in store.list(three_root + "/") if "/work/done/scan/" in k]
        return keys if any(int(k.rsplit("/", 1)[1][:-5]) % 3 == 1 for k in keys) else None

    try:
        wait_for(worker_one_finished_an_item, 300, "worker 1 of prep-three finished a scan item", interval=0.2)
    except AssertionError:
        raise AssertionError(node_agent.logs(namespace)) from None
    victim = next(p for p in core.list_namespaced_pod(namespace, label_selector="dhad.dev/job=prep-three").items
                  if p.metadata.annotations.get("batch.kubernetes.io/job-completion-index") == "1")
    core.delete_namespaced_pod(victim.metadata.name, namespace)  # SIGTERM: the worker process ends at once
    at_kill = {}
    for key in store.list(three_root + "/"):
        if "/work/done/" in key:
            stage, item = key.rsplit("/", 2)[-2:]
            at_kill.setdefault(stage, {})[str(int(item[:-5]))] = json.loads(store.get_bytes(key))
    try:
        three = wait_state(kube, namespace, "PretrainJob", "prep-three", "Succeeded", 600)["status"]
    except AssertionError as error:
        raise AssertionError(f"{error}\n{node_agent.logs(namespace)}") from None
    assert three["attempt"] == 1 and "outputModel" not in three  # the Job retried the index, not the operator

    _apply(control_plane, namespace, _manifest("prep-one", namespace, s3_server, s3_bucket, 1, f"{base}/prepared-one"), tmp_path)
    try:
        one = wait_state(kube, namespace, "PretrainJob", "prep-one", "Succeeded", 600)["status"]
    except AssertionError as error:
        raise AssertionError(f"{error}\n{node_agent.logs(namespace)}") from None

    p3, p1 = _pointer(store, three), _pointer(store, one)
    assert p3["key"] == p1["key"] and p3["uri"] != p1["uri"]  # the same identity, prepared twice on purpose
    assert json.loads(store.get_bytes(f"{p3['uri']}/{STATS_FILE}")) == json.loads(store.get_bytes(f"{p1['uri']}/{STATS_FILE}"))
    blocks = list(iter_blocks(store, p3["uri"]))
    assert blocks and blocks == list(iter_blocks(store, p1["uri"]))

    passes = json.loads(store.get_bytes(f"{p3['uri']}/{PASSES_FILE}"))
    for stage, items in at_kill.items():  # nothing finished before the deletion ran again
        for item, marker in items.items():
            assert passes[stage][item]["worker"] == marker["worker"] and passes[stage][item]["started"] == marker["started"]
    index_one = {m["worker"] for stage, items in passes.items() for i, m in items.items()
                 if (int(i) + (0 if stage != "bucket" else len(passes["scan"]))) % 3 == 1 and stage != "vocabulary"}
    assert len(index_one) == 2, index_one  # the deleted pod's process and its replacement's
    pods_of_index_one = [p for p in core.list_namespaced_pod(namespace, label_selector="dhad.dev/job=prep-three").items
                         if p.metadata.annotations.get("batch.kubernetes.io/job-completion-index") == "1"]
    others = [p for p in core.list_namespaced_pod(namespace, label_selector="dhad.dev/job=prep-three").items
              if p.metadata.annotations.get("batch.kubernetes.io/job-completion-index") != "1"]
    assert len(others) == 2 and len(pods_of_index_one) >= 1
    bucket, key = split_s3(p3["uri"])
    assert not list(s3_server.client().list_objects(bucket, key + "/work/", recursive=True))  # intermediates removed
    assert get(kube, namespace, "PretrainJob", "prep-three")["status"]["stages"][0]["state"] == "Succeeded"
