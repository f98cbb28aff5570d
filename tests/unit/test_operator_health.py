"""/healthz fails when the replica is wedged, as the kubelet needs it to (a restart may help), and
recovers when it is not: a reconcile stuck past its limit, the queue's timer stopped, a watch loop that
has not moved. Served by the real Health server, asked over HTTP as a liveness probe asks."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request

import pytest

from dhad_operator.controller import Controller
from dhad_operator.health import Health
from dhad_operator.k8s import RESOURCES, Informer, Kube, Store
from dhad_operator.render import Defaults
from tests.conftest import wait_for
from tests.harness.processes import free_port


def probe(port: int, path: str = "/healthz") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture
def served():
    """A controller over empty caches, its checks wired as the operator's main wires them, served."""
    kube = Kube(rest=None)
    informer = Informer(None, RESOURCES["SFTJob"], Store("SFTJob"), None, {}, None)  # never started: its loop does not move
    kube.informers = [informer]
    informer.synced.set()
    controller = Controller(kube, Defaults(), stuck_after=0.5, workers=1)
    health = Health()
    health.ready = kube.synced
    health.problems = [lambda: kube.stalled(400.0), controller.wedged]
    port = free_port()
    health.serve(f"http://127.0.0.1:{port}")
    wait_for(lambda: probe(port, "/readyz")[0] == 200, timeout=10, what="/readyz")
    yield kube, controller, informer, port
    controller.stop()


def test_a_reconcile_stuck_past_its_limit_fails_healthz_until_it_returns(served):
    kube, controller, _, port = served
    release, entered = threading.Event(), threading.Event()

    def stuck(key):
        entered.set()
        release.wait(30)

    controller.reconcile = stuck
    assert probe(port) == (200, "ok\n")
    controller.start()
    controller.queue.add(("SFTJob", "ml", "stuck"))
    assert entered.wait(10)
    wait_for(lambda: probe(port)[0] == 503, timeout=10, what="/healthz to fail")
    assert "a reconcile has run for over" in probe(port)[1]
    release.set()
    wait_for(lambda: probe(port) == (200, "ok\n"), timeout=10, what="/healthz to recover")


def test_a_stopped_queue_timer_fails_healthz(served):
    _, controller, _, port = served
    controller.queue.shutdown()  # its timer thread returns
    time.sleep(0.2)
    controller.queue.heartbeat -= 100  # and 100 s pass without it
    status, body = probe(port)
    assert status == 503 and "the queue's timer stopped" in body


def test_a_watch_loop_that_has_not_moved_fails_healthz_naming_it(served):
    _, _, informer, port = served
    informer.heartbeat -= 401
    status, body = probe(port)
    assert status == 503 and informer.name in body
    informer.heartbeat = time.monotonic()
    assert probe(port) == (200, "ok\n")
