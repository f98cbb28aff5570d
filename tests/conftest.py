"""Session-wide real parts: one control plane, one set of kwok GPU nodes, one S3 server and bucket.

Started once per test session (they cost seconds, and the garbage collector discovers new CRDs only
after a delay), torn down even when tests fail. Each test gets its own namespace and S3 prefix.

Markers: `cluster`, `s3` and `torchrun` say which real parts a test starts (a test that asks for the
control plane or the S3 server without its marker is a collection error, so `-m unit` never starts
one); every other test is marked `unit`, those are `integration`. `benchmarks` tests read the real
AceGPT files: where they are absent the tests are skipped, and under CI they fail instead.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dhad_trainer.evaluation.loaders import BENCHMARKS_ENV, acegpt_files
from tests.harness.controlplane import ControlPlane, control_plane_bin
from tests.harness.kwok import create_gpu_nodes, start_kwok
from tests.harness.s3 import S3Server

REPO = Path(__file__).resolve().parents[1]
if not os.environ.get("TORCH_EXTENSIONS_DIR"):  # pytest run without hack/env.sh: the same op cache it names
    os.environ["TORCH_EXTENSIONS_DIR"] = subprocess.run(
        ["bash", "-c", 'source hack/env.sh && printf %s "$TORCH_EXTENSIONS_DIR"'], cwd=REPO, capture_output=True,
        text=True, check=True).stdout
# The real AceGPT files ($DHAD_BENCHMARKS, else ../shared/benchmarks/acegpt), or None on this machine.
BENCHMARKS = acegpt_files(REPO)
# Where `benchmarks` tests read them (the gate below keeps those tests from running when they are absent).
ACEGPT = BENCHMARKS or REPO.parent / "shared" / "benchmarks" / "acegpt"
# Which real part each marker stands for, by the session fixture that starts it.
REAL_PARTS = {"cluster": "control_plane", "s3": "s3_server"}
INTEGRATION = ("cluster", "s3", "torchrun")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks unit/integration from the real-part markers, and refuses a test whose fixtures start a
    real part its markers do not name (it would slip into the fast loop)."""
    wrong = []
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        for marker, fixture in REAL_PARTS.items():
            if fixture in names and item.get_closest_marker(marker) is None:
                wrong.append(f"{item.nodeid} uses {fixture} but is not marked {marker}")
        integration = any(item.get_closest_marker(m) for m in INTEGRATION)
        item.add_marker(pytest.mark.integration if integration else pytest.mark.unit)
    if wrong:
        raise pytest.UsageError("tests start real parts their markers do not name:\n  " + "\n  ".join(wrong))


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("benchmarks") and BENCHMARKS is None:
        why = (f"needs the AceGPT benchmark files: set {BENCHMARKS_ENV} to their folder "
               f"(or put them at {REPO.parent / 'shared' / 'benchmarks' / 'acegpt'})")
        if in_ci():
            pytest.fail(f"{why}; CI runs every test, so a missing input fails", pytrace=False)
        pytest.skip(why)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """Counts the tests that needed the real benchmark files, so a run without them shows it."""
    outcomes: dict[str, int] = {}
    for outcome in ("passed", "failed", "error", "skipped"):
        for report in terminalreporter.stats.get(outcome, []):
            if "benchmarks" in getattr(report, "keywords", {}) and getattr(report, "when", "call") in ("call", "setup"):
                if outcome == "passed" and report.when != "call":
                    continue
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
    if outcomes:
        where = BENCHMARKS or f"not found (set {BENCHMARKS_ENV})"
        counts = ", ".join(f"{n} {o}" for o, n in sorted(outcomes.items()))
        terminalreporter.write_line(f"tests needing the AceGPT benchmark files (marker benchmarks, files {where}): {counts}")


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
