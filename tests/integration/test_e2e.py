"""End to end on a local cluster: `kubectl apply` of the tiny SFT example trains through real torchrun
across two pods (run by the test node agent), checkpoints to the real S3 server, reports progress
through its own ServiceAccount, and ends Succeeded with outputModel; killing a pod mid-run gives a
gang restart that resumes from the newest checkpoint."""

from __future__ import annotations

import base64
import json
import re

import pytest
import yaml
from kubernetes import client

from dhad_api.layout import split_s3
from dhad_trainer.data.chat import ASSETS
from dhad_trainer.local.tiny import init_tiny_model
from tests.conftest import wait_for
from tests.harness.controlplane import kubectl
from tests.harness.node_agent import ON_AGENT, node_agent  # noqa: F401 - the fixture
from tests.integration.jobs import REPO, get, pods, wait_state

pytestmark = [pytest.mark.cluster, pytest.mark.s3, pytest.mark.torchrun]


def _upload_dir(s3_server, uri: str, folder) -> None:
    bucket, key = split_s3(uri)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        s3_server.client().fput_object(bucket, f"{key}/{path.relative_to(folder)}", str(path))


def _manifest(namespace: str, s3_server, bucket: str, tmp_path) -> dict:
    doc = yaml.safe_load((REPO / "examples" / "tiny" / "sft.yaml").read_text())
    base = f"s3://{bucket}/{namespace}"
    _upload_dir(s3_server, f"{base}/models/tiny-base", init_tiny_model(tmp_path / "tiny-base"))
    s3_server.client().fput_object(bucket, f"{namespace}/data/arabic_instructions.jsonl", str(ASSETS / "arabic_instructions.jsonl"))
    spec = doc["spec"]
    spec["model"] = {"uri": f"{base}/models/tiny-base", "dtype": "float32"}
    spec["data"][0]["uri"] = f"{base}/data/arabic_instructions.jsonl"
    spec["storage"] = {"endpoint": s3_server.url, "bucket": bucket, "prefix": namespace, "secretRef": {"name": "dhad-s3"}}
    spec["resources"] = {"nodes": 2, "gpusPerNode": 0, "sharedMemory": "256Mi"}
    spec["checkpoint"] = {"intervalSteps": 4, "keepLast": 2}
    spec["training"].update(maxSteps=16, logEverySteps=2)
    spec["restartPolicy"] = {"maxRestarts": 2, "backoffSeconds": 1}
    spec["env"] = [{"name": "DHAD_PROGRESS_INTERVAL", "value": "1"}]
    spec["podTemplate"] = ON_AGENT
    return doc


def test_kubectl_apply_trains_across_two_pods_and_survives_a_killed_pod(
        kube, namespace, control_plane, dhad_operator, node_agent, s3_server, s3_bucket, tmp_path):  # noqa: F811
    core = client.CoreV1Api(kube)
    core.create_namespaced_secret(namespace, client.V1Secret(metadata=client.V1ObjectMeta(name="dhad-s3"), data={
        "AWS_ACCESS_KEY_ID": base64.b64encode(s3_server.access_key.encode()).decode(),
        "AWS_SECRET_ACCESS_KEY": base64.b64encode(s3_server.secret_key.encode()).decode()}))
    manifest = tmp_path / "sft.yaml"
    manifest.write_text(yaml.safe_dump(_manifest(namespace, s3_server, s3_bucket, tmp_path), allow_unicode=True))
    applied = kubectl(control_plane, "apply", "-n", namespace, "-f", str(manifest))
    assert "sftjob.dhad.dev/tiny-sft created" in applied.stdout

    def checkpointed():
        status = get(kube, namespace, "SFTJob", "tiny-sft").get("status") or {}
        return status if status.get("lastCheckpoint") and status.get("attempt") == 1 else None

    try:
        first = wait_for(checkpointed, 300, "a checkpoint reported by attempt 1", interval=1)
    except AssertionError:
        raise AssertionError(node_agent.logs(namespace)) from None
    assert first["progress"]["step"] >= 4 and first["progress"].get("loss") is not None
    assert first["progress"].get("tokensPerSecond", 0) > 0, first["progress"]  # SFT's rate, from TRL's num_tokens
    victim = pods(kube, namespace, "tiny-sft", 1, "Running")[1]
    core.delete_namespaced_pod(victim.metadata.name, namespace)
    try:
        done = wait_state(kube, namespace, "SFTJob", "tiny-sft", "Succeeded", 420)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{node_agent.logs(namespace)}") from None
    status = done["status"]
    assert status["attempt"] >= 2, status
    assert status["outputModel"].endswith("/sft/model")
    bucket, key = split_s3(status["outputModel"])
    names = {o.object_name.rsplit("/", 1)[-1] for o in s3_server.client().list_objects(bucket, key + "/", recursive=True)}
    assert {"config.json", "model.safetensors"} <= names
    second = [p for p in pods(kube, namespace, "tiny-sft") if p.metadata.labels["dhad.dev/attempt"] == str(status["attempt"])]
    log = "\n".join(node_agent.pod_log(namespace, p.metadata.name) for p in second)
    resumed = re.findall(r"resuming from (s3://\S+/checkpoints/step-(\d{6}))", log)
    assert len(resumed) == 2 and len(set(resumed)) == 1, log[-3000:]  # each node's leader fetches the same one
    checkpoint, step = resumed[0][0], int(resumed[0][1])
    # the newest checkpoint when the pod died: at least the one attempt 1 had reported, short of the end
    # (an interval's, or the one the deleted pod's SIGTERM saved at whatever step it had reached)
    assert step_of(first["lastCheckpoint"]) <= step < 16, (checkpoint, first)
    assert checkpoint.startswith(f"s3://{s3_bucket}/{namespace}/"), checkpoint
    logged = [int(n) for n in re.findall(r"\bstep (\d+)/16 loss", log)]
    # every logged step (each 2nd) after the resumed one, once, in order: a SIGTERM checkpoint may be odd
    assert logged == [n for n in range(2, 17, 2) if n > step], log[-3000:]
    assert status["progress"]["step"] == 16 and step_of(status["lastCheckpoint"]) == 16
    bucket, key = split_s3(status["lastCheckpoint"])
    state = json.loads(s3_server.client().get_object(bucket, f"{key}/node-0/trainer_state.json").read())
    history = [h["step"] for h in state["log_history"] if "loss" in h]
    assert history == list(range(2, 17, 2)), history  # across both attempts: no step trained twice


def step_of(checkpoint_uri: str) -> int:
    return int(re.fullmatch(r".*/step-(\d{6})", checkpoint_uri).group(1))
