"""Which watch events wake which job: thin, and the only place that decides it.

The caches hold slim objects (observe.slim: what decide() reads), so the filter is one rule: an
event wakes a job only when the slim form of the object changed (added, deleted, or a field decide
reads). That drops what cannot change the plan: our own writes coming back (the cache already has
them, so they are not even stored again), the Job controller's counters, Pod IPs, readiness flips,
annotations, managedFields, the spec ConfigMap's data, a repeated FailedCreate. Children wake the
job named by their labels (ownership is checked by the reconcile, from the caches); the namespace's
worker Service, which no job owns, wakes every unfinished job of its namespace when someone else
changes or deletes it (whichever runs first makes it again, or fails on a Service not ours); a job
that references another (model.fromJob) is woken by that job's changes until it has started. A
Pipeline is woken by its own changes and by those of its stage jobs (labelled dhad.dev/pipeline):
their status is what it reads. A stage job the pipeline created or suspended is woken by that write's
answer (the watch brings nothing newer). The step cache wakes nothing: a pipeline reads it when it runs.
"""

from __future__ import annotations

import threading

from dhad_api.pipeline import LABEL_PIPELINE
from dhad_operator import metrics, observe
from dhad_operator.controller import WorkQueue
from dhad_operator.k8s import JOB_KINDS, PIPELINE, STEP_CACHE, Kube
from dhad_operator.render import LABEL_JOB, LABEL_KIND, namespace_child_names

FINISHED = ("Succeeded", "Failed")


def model_references(spec: dict) -> set[tuple[str, str]]:
    """Every (kind, name) under a `fromJob` anywhere in a raw spec (cheap: no validation)."""
    found: set[tuple[str, str]] = set()
    stack = [spec]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            ref = value.get("fromJob")
            if isinstance(ref, dict) and ref.get("kind") and ref.get("name"):
                found.add((str(ref["kind"]), str(ref["name"])))
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return found


class Router:
    """on_change(kind, old, new) from the informers -> keys added to the work queue."""

    def __init__(self, kube: Kube, queue: WorkQueue):
        self.kube, self.queue = kube, queue
        self._referrers: dict[tuple[str, str, str], set] = {}  # (namespace, kind, name) -> referring keys
        self._lock = threading.Lock()  # informers call in from one thread each

    def on_change(self, kind: str, old: dict | None, new: dict | None, ours: bool = False) -> None:
        """`ours`: the change is our own write's answer; it wakes only jobs that wait for this one."""
        if kind in ("Node", STEP_CACHE) or observe.same(old, new):
            return  # nodes only feed the Planned condition of jobs that are reconciled anyway
        if kind == PIPELINE:
            if not ours:
                self._pipeline_changed(old, new)
            return
        if ours:
            if kind in JOB_KINDS:
                self._our_job_write(kind, old, new)
            return
        if kind in JOB_KINDS:
            self._job_changed(kind, old, new)
            self._wake_pipeline(new or old)
        elif (kind, (new or old)["metadata"]["name"]) in namespace_child_names():
            self._wake_namespace((new or old)["metadata"]["namespace"])
        elif kind == "Event":
            job = self.kube.stores["Job"].by_uid((new or old)["involvedObject"].get("uid") or "")
            if job is not None:
                self._wake_labelled(job)
        else:
            self._wake_labelled(new or old)

    def _wake_labelled(self, child: dict) -> None:
        labels = child["metadata"].get("labels") or {}
        if labels.get(LABEL_KIND) in JOB_KINDS and labels.get(LABEL_JOB):
            self.queue.add((labels[LABEL_KIND], child["metadata"]["namespace"], labels[LABEL_JOB]))

    def _our_job_write(self, kind: str, old: dict | None, new: dict) -> None:
        if old is None or old.get("spec") != new.get("spec"):  # a pipeline created it, or changed its suspend
            key = (kind, new["metadata"]["namespace"], new["metadata"]["name"])
            self._index_references(key, old, new)
            self.queue.add(key)
        if (old or {}).get("status") != new.get("status"):
            self._wake_referrers(new)
            self._wake_pipeline(new)

    def _pipeline_changed(self, old: dict | None, new: dict | None) -> None:
        meta = (new or old)["metadata"]
        key = (PIPELINE, meta["namespace"], meta["name"])
        if new is None:
            metrics.JOB_STATES.set(*key, None)
            self.queue.drop(key)
        else:
            self.queue.add(key)

    def _wake_pipeline(self, job: dict) -> None:
        """A stage job's change (its status, its deletion) is its pipeline's to act on."""
        meta = job["metadata"]
        if pipeline := (meta.get("labels") or {}).get(LABEL_PIPELINE):
            self.queue.add((PIPELINE, meta["namespace"], pipeline))

    def _wake_namespace(self, namespace: str) -> None:
        for kind in JOB_KINDS:
            for job in self.kube.stores[kind].all():
                meta = job["metadata"]
                if meta["namespace"] == namespace and (job.get("status") or {}).get("state") not in FINISHED:
                    self.queue.add((kind, namespace, meta["name"]))

    def _job_changed(self, kind: str, old: dict | None, new: dict | None) -> None:
        meta = (new or old)["metadata"]
        key = (kind, meta["namespace"], meta["name"])
        self._index_references(key, old, new)
        if new is None:
            metrics.JOB_STATES.set(kind, meta["namespace"], meta["name"], None)
            self.queue.drop(key)
        else:
            self.queue.add(key)
        if old is None or new is None or (old.get("status") or {}) != (new.get("status") or {}):
            self._wake_referrers(new or old)

    def _wake_referrers(self, job: dict) -> None:
        meta = job["metadata"]
        with self._lock:
            referrers = sorted(self._referrers.get((meta["namespace"], job["kind"], meta["name"]), ()))
        for referrer in referrers:
            waiting = self.kube.cached(*referrer)
            if waiting is not None and not (waiting.get("status") or {}).get("startTime"):
                self.queue.add(referrer)

    def _index_references(self, key, old: dict | None, new: dict | None) -> None:
        before = model_references((old or {}).get("spec") or {}) if old else set()
        after = model_references((new or {}).get("spec") or {}) if new else set()
        with self._lock:
            self._update_referrers(key, before, after)

    def _update_referrers(self, key, before: set, after: set) -> None:
        namespace = key[1]
        for ref in before - after:
            holders = self._referrers.get((namespace, *ref), set())
            holders.discard(key)
            if not holders:
                self._referrers.pop((namespace, *ref), None)
        for ref in after - before:
            self._referrers.setdefault((namespace, *ref), set()).add(key)
