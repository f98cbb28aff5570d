"""Session-wide real parts: one control plane, one set of kwok GPU nodes, one S3 server and bucket.

Started once per test session (they cost seconds, and the garbage collector discovers new CRDs only
after a delay), torn down even when tests fail. Each test gets its own namespace and S3 prefix.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.controlplane import ControlPlane, control_plane_bin
from tests.harness.kwok import create_gpu_nodes, start_kwok
from tests.harness.s3 import S3Server

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO.parent / "shared" / "benchmarks" / "acegpt"


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    cp = ControlPlane(tmp_path_factory.mktemp("control-plane"), control_plane_bin())
    cp.start()
    try:
        start_kwok(cp)
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def kube(control_plane: ControlPlane):
    """An admin API client (kubernetes.client.ApiClient) for the test control plane."""
    from kubernetes import config

    api = config.new_client_from_config(config_file=str(control_plane.kubeconfig))
    yield api
    api.close()


@pytest.fixture(scope="session")
def gpu_nodes(kube) -> list[str]:
    """Two kwok nodes with 8 `nvidia.com/gpu` each, Ready."""
    from kubernetes import client

    core = client.CoreV1Api(kube)
    names = create_gpu_nodes(core, count=2, gpus=8)
    wait_for(lambda: all(_node_ready(core.read_node(n)) for n in names), 60, "kwok nodes Ready")
    return names


def _node_ready(node) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in (node.status.conditions or []))


@pytest.fixture
def namespace(kube, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test, once its `default` ServiceAccount exists (pods need it)."""
    from kubernetes import client

    core = client.CoreV1Api(kube)
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:5]
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    wait_for(lambda: core.read_namespaced_service_account("default", name), 60, f"default SA in {name}")
    yield name
    core.delete_namespace(name)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_bucket(s3_server: S3Server) -> str:
    bucket = "dhad-test-" + uuid.uuid4().hex[:8]
    s3_server.client().make_bucket(bucket)
    return bucket


@pytest.fixture
def s3_prefix(s3_bucket: str, request: pytest.FixtureRequest) -> str:
    """`s3://<session bucket>/<test name>-<random>`: a private corner of the bucket for one test."""
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    return f"s3://{s3_bucket}/{name}-{uuid.uuid4().hex[:6]}"


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    """Polls `predicate` until it returns something truthy; fails the test naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as error:  # noqa: BLE001 - retried until the deadline
            last_error = error
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last error: {last_error!r}")


@pytest.fixture(scope="session")
def crds_installed(kube) -> list[str]:
    """Dhad's CRDs from crds/, applied once per session and Established (discovery takes a moment)."""
    import yaml
    from kubernetes import client

    ext = client.ApiextensionsV1Api(kube)
    names = []
    for path in sorted((REPO / "crds").glob("*.yaml")):
        body = yaml.safe_load(path.read_text())
        names.append(body["metadata"]["name"])
        ext.create_custom_resource_definition(body)

    def established() -> bool:
        return all(
            any(c.type == "Established" and c.status == "True" for c in ext.read_custom_resource_definition(n).status.conditions or [])
            for n in names
        )

    wait_for(established, 60, "Dhad CRDs Established")
    custom = client.CustomObjectsApi(kube)
    wait_for(lambda: all(custom.list_cluster_custom_object("dhad.dev", "v1alpha1", n.split(".")[0]) is not None for n in names),
             60, "Dhad CRDs served")
    return names


@pytest.fixture(scope="session")
def dhad_operator(control_plane, crds_installed, gpu_nodes, tmp_path_factory):
    """The operator as a subprocess for the whole session; tests that kill it `pause()` this one."""
    from tests.harness.operator import OperatorRunner

    runner = OperatorRunner(control_plane, tmp_path_factory.mktemp("operator"))
    runner.start()
    yield runner
    runner.stop()
