"""The operator killed with SIGKILL at 20 seeded moments during a burst of applies, deletes and pod
failures: no two Jobs of a job ever overlap, attempts are contiguous, nothing is orphaned, and every
job ends in the state its pods dictate. And killed at exact moments: after each write of a new job's
first reconcile, and with a status write in flight."""

from __future__ import annotations

import logging
import random
import threading
import time

import pytest
from kubernetes import client, watch

from tests.conftest import wait_for
from tests.harness.operator import start_operator
from tests.integration.jobs import apply, exit_pod, get, pods, running_pods, tiny, wait_state

pytestmark = pytest.mark.cluster
log = logging.getLogger("chaos")
SEED = 20261126
JOBS = 10
KILLS = 20


class JobRecorder:
    """Watches every Job in the namespace and records ADDED/DELETED in resourceVersion order."""

    def __init__(self, kube, namespace: str):
        self.events: list[tuple[str, str, str, int]] = []
        self._watch = watch.Watch()
        self._thread = threading.Thread(target=self._run, args=(client.BatchV1Api(kube), namespace), daemon=True)
        self._thread.start()

    def _run(self, batch, namespace):
        try:
            self._record(batch, namespace)
        except Exception as error:  # noqa: BLE001 - the stream ends when stop() closes it
            log.info("job watch ended: %r", error)

    def _record(self, batch, namespace):
        for event in self._watch.stream(batch.list_namespaced_job, namespace, timeout_seconds=600):
            job = event["object"]
            labels = job.metadata.labels or {}
            if event["type"] in ("ADDED", "DELETED"):
                self.events.append((event["type"], labels.get("dhad.dev/job"), job.metadata.name, int(labels.get("dhad.dev/attempt", 0))))

    def stop(self):
        self._watch.stop()


def test_operator_survives_sigkill_at_twenty_moments(kube, namespace, control_plane, dhad_operator, tmp_path):
    rng = random.Random(SEED)
    dhad_operator.stop()  # this test runs its own, killable operator
    recorder = JobRecorder(kube, namespace)
    operator = start_operator(control_plane, tmp_path, "chaos-operator-0")
    names = [f"chaos-{i}" for i in range(JOBS)]
    deleted: set[str] = set()
    custom = client.CustomObjectsApi(kube)
    try:
        kills = 0
        next_kill = time.monotonic() + rng.uniform(0.3, 1.5)
        actions = [("apply", n) for n in names] + [("fail", rng.choice(names)) for _ in range(12)] + [("delete", n) for n in rng.sample(names, 3)]
        rng.shuffle(actions)
        actions = sorted(actions, key=lambda a: a[0] != "apply" and rng.random())  # applies first, the rest mixed
        for verb, name in actions:
            if verb == "apply":
                apply(kube, namespace, tiny("sft", restartPolicy={"maxRestarts": 30, "noProgressAttempts": 100, "backoffSeconds": 0, "maxBackoffSeconds": 1}), name)
            elif verb == "fail" and name not in deleted:
                running = pods(kube, namespace, name, phase="Running")
                if running:
                    exit_pod(kube, namespace, rng.choice(running), 1, "injected failure")
            elif verb == "delete" and name not in deleted:
                custom.delete_namespaced_custom_object("dhad.dev", "v1alpha1", namespace, "sftjobs", name)
                deleted.add(name)
            time.sleep(rng.uniform(0.05, 0.4))
            while time.monotonic() >= next_kill and kills < KILLS:
                kills += 1
                log.warning("chaos: SIGKILL %d of the operator (seed %d)", kills, SEED)
                operator.kill()
                operator = start_operator(control_plane, tmp_path, f"chaos-operator-{kills}")
                next_kill = time.monotonic() + rng.uniform(0.3, 2.0)
        while kills < KILLS:  # the rest of the kills while jobs restart and run
            time.sleep(rng.uniform(0.3, 1.5))
            for name in set(names) - deleted:
                running = pods(kube, namespace, name, phase="Running")
                if running and rng.random() < 0.3:
                    exit_pod(kube, namespace, rng.choice(running), 1, "injected failure")
            kills += 1
            log.warning("chaos: SIGKILL %d of the operator (seed %d)", kills, SEED)
            operator.kill()
            operator = start_operator(control_plane, tmp_path, f"chaos-operator-{kills}")
        survivors = sorted(set(names) - deleted)

        def all_succeeded():
            for name in survivors:
                for pod in pods(kube, namespace, name, phase="Running"):
                    exit_pod(kube, namespace, pod, 0)
            return all((get(kube, namespace, "SFTJob", n).get("status") or {}).get("state") == "Succeeded" for n in survivors)

        try:
            wait_for(all_succeeded, 180, "every surviving job Succeeded", interval=1.0)
        except AssertionError:
            states = {n: (get(kube, namespace, "SFTJob", n).get("status") or {}) for n in survivors}
            raise AssertionError({n: (s.get("state"), s.get("attempt"), s.get("endedAttempt"), s.get("conditions", [])[-1:]) for n, s in states.items()}) from None
    finally:
        operator.stop()
        recorder.stop()
        dhad_operator.start()

    by_job: dict[str, list] = {}
    for event in recorder.events:
        by_job.setdefault(event[1], []).append(event)
    for name in survivors:
        status = get(kube, namespace, "SFTJob", name)["status"]
        attempts = [a for kind, _, _, a in by_job[name] if kind == "ADDED"]
        assert attempts == list(range(1, status["attempt"] + 1)), f"{name}: Jobs created for attempts {attempts}"
        live: set[int] = set()
        for kind, _, job, attempt in by_job[name]:
            if kind == "ADDED":
                assert not live, f"{name}: {job} created while attempts {live} still existed"
                live.add(attempt)
            else:
                live.discard(attempt)
        assert status["restarts"] == status["attempt"] - 1
    core, rbac = client.CoreV1Api(kube), client.RbacAuthorizationV1Api(kube)
    existing = {o["metadata"]["uid"] for o in custom.list_namespaced_custom_object("dhad.dev", "v1alpha1", namespace, "sftjobs")["items"]}

    def orphans():
        services = [s for s in core.list_namespaced_service(namespace).items if s.metadata.name != "dhad-workers"]  # no job owns that one
        children = (client.BatchV1Api(kube).list_namespaced_job(namespace).items + services
                    + core.list_namespaced_config_map(namespace, label_selector="dhad.dev/job").items
                    + core.list_namespaced_service_account(namespace, label_selector="dhad.dev/job").items
                    + rbac.list_namespaced_role(namespace).items + rbac.list_namespaced_role_binding(namespace).items)
        return [c.metadata.name for c in children if not any(r.uid in existing for r in c.metadata.owner_references or [])]

    wait_for(lambda: not orphans(), 90, "no orphaned children")
    assert core.read_namespaced_service("dhad-workers", namespace).metadata.labels == {"app.kubernetes.io/managed-by": "dhad-operator"}


CREATES_FOR_A_NEW_JOB = 7  # the namespace's Service, 5 static children and the Job


def _children(kube, namespace: str, name: str) -> list:
    """What the first job of a namespace makes: the namespace's Service (no job's) and the job's own children."""
    core, rbac = client.CoreV1Api(kube), client.RbacAuthorizationV1Api(kube)
    selector = f"dhad.dev/job={name}"
    return (core.list_namespaced_service(namespace, field_selector="metadata.name=dhad-workers").items
            + core.list_namespaced_config_map(namespace, label_selector=selector).items
            + core.list_namespaced_service_account(namespace, label_selector=selector).items
            + rbac.list_namespaced_role(namespace, label_selector=selector).items
            + rbac.list_namespaced_role_binding(namespace, label_selector=selector).items
            + client.BatchV1Api(kube).list_namespaced_job(namespace, label_selector=selector).items)


def test_operator_killed_between_every_pair_of_writes_and_during_status_writes(kube, control_plane, dhad_operator, tmp_path):
    """A new job's first reconcile makes the 3 objects its pods need and the Job (in parallel, the Job once the
    ServiceAccount is made), then writes status while the progress ConfigMap, Role and RoleBinding are made
    in the background: the operator exits right after each of those 8 writes, and with its status write in
    flight; a fresh operator then brings every job to exactly the state one uninterrupted reconcile would
    have (all children ours, one Job, attempt 1), and they all succeed."""
    dhad_operator.stop()
    core = client.CoreV1Api(kube)
    moments = [f"after-writes:{k}" for k in range(1, CREATES_FOR_A_NEW_JOB + 2)] + ["in-status:1"]
    spaces = []
    try:
        for i, moment in enumerate(moments):
            namespace = f"crash-{i}-{SEED % 1000}"
            core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
            spaces.append(namespace)
            wait_for(lambda ns=namespace: core.read_namespaced_service_account("default", ns), 60, "default SA")
            crashing = start_operator(control_plane, tmp_path, f"crash-{i}", {"DHAD_TEST_CRASH": moment, "DHAD_WATCH_NAMESPACES": namespace})
            apply(kube, namespace, tiny("sft", resources={"nodes": 2, "gpusPerNode": 0}, podTemplate={"nodeSelector": {"type": "kwok"}}),
                  "crashed")  # CPU pods, on kwok nodes only (a node agent would really run them): all fit at once
            wait_for(lambda p=crashing: p.popen.poll() is not None, 60, f"the operator exits at {moment}")
            assert crashing.popen.returncode == 137, crashing.popen.returncode
            crashing.stop()
            made = _children(kube, namespace, "crashed")
            if moment.startswith("after-writes"):
                writes, names = int(moment.split(":")[1]), [c.metadata.name for c in made]
                recorded = (get(kube, namespace, "SFTJob", "crashed").get("status") or {}).get("attempt", 0) == 1
                assert len(made) <= CREATES_FOR_A_NEW_JOB and len(made) + recorded >= min(writes, CREATES_FOR_A_NEW_JOB + 1), (moment, names)
                assert "crashed-sft-1" in names or not recorded, (moment, names)  # status records an attempt after its Job
                # the Job goes out once its pods' ServiceAccount is made (admission refuses pods without it); the
                # Service and the spec ConfigMap go out beside it, since pods wait for those (Kube._create_all)
                assert "crashed-sft-1" not in names or "crashed-sft-trainer" in names, (moment, names)
        operator = start_operator(control_plane, tmp_path, "after-the-crashes")
        try:
            for namespace in spaces:
                running = running_pods(kube, namespace, "crashed", 1, 2, 60)
                uid = get(kube, namespace, "SFTJob", "crashed")["metadata"]["uid"]
                made = wait_for(lambda ns=namespace: (lambda found: found if len(found) == CREATES_FOR_A_NEW_JOB else None)(
                    _children(kube, ns, "crashed")), 30, "every child")
                assert all(child.metadata.owner_references[0].uid == uid for child in made if child.metadata.name != "dhad-workers")
                assert [c.metadata.labels for c in made if c.metadata.name == "dhad-workers"] == [{"app.kubernetes.io/managed-by": "dhad-operator"}]
                assert [j.metadata.name for j in client.BatchV1Api(kube).list_namespaced_job(namespace).items] == ["crashed-sft-1"]
                for pod in running:
                    exit_pod(kube, namespace, pod, 0)
            for namespace in spaces:
                done = wait_state(kube, namespace, "SFTJob", "crashed", "Succeeded", 60)
                assert done["status"]["attempt"] == 1 and done["status"].get("restarts", 0) == 0
        finally:
            operator.stop()
    finally:
        for namespace in spaces:
            core.delete_namespace(namespace)
        dhad_operator.start()
