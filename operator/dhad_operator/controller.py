"""The work queue and its workers: each job's reconcile, from the caches, one at a time per job.

The queue has client-go's semantics: a key is never processed by two workers at once; events for a
key that is queued or in flight mark it dirty, which causes at most one more reconcile after the
current one; keys never reconciled go before the others (a burst of new jobs is not held up by the
follow-ups of older ones); errors back off exponentially per key up to a cap; a plan's next timer
(deadline, hang, unschedulable, backoff, TTL) becomes a delayed add at exactly that moment.

Workers wait until every cache has listed (the barrier) and while this replica does not lead.
A Pipeline key runs the pipeline reconcile (pipeline.py) the same way: its stage jobs and the step
cache from the caches, its plan through Kube.execute_pipeline.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque

from dhad_api.jobs import parse_spec
from dhad_api.references import references
from dhad_operator import metrics, observe
from dhad_operator import pipeline as pipelines
from dhad_operator.k8s import JOB_KINDS, PIPELINE, ApiError, Kube, NotLeading, owner_description
from dhad_operator.reconcile import Foreign, Observed, decide
from dhad_operator.render import (
    Defaults,
    Owner,
    managed_by_us,
    namespace_child_names,
    progress_config_map_name,
)
from dhad_operator.status import now_utc, rfc3339

log = logging.getLogger("dhad.controller")
Key = tuple[str, str, str]  # kind, namespace, name
STATIC_KINDS = ("ConfigMap", "ServiceAccount", "Role", "RoleBinding")  # what a job owns besides its Jobs


class WorkQueue:
    """A FIFO of keys with client-go workqueue semantics (see the module docstring)."""

    def __init__(self, base_delay: float = 0.1, max_delay: float = 300.0, clock=time.monotonic):
        self.base_delay, self.max_delay, self.clock = base_delay, max_delay, clock
        self._cond = threading.Condition()
        self._fresh: deque = deque()  # never reconciled: first
        self._queue: deque = deque()
        self._dirty: set = set()
        self._processing: dict = {}  # key -> when it was handed out
        self._seen: set = set()
        self._added_at: dict = {}
        self._failures: dict = {}
        self._delayed: list = []  # (due, seq, key)
        self._due: dict = {}  # key -> its earliest delayed add
        self._seq = itertools.count()
        self._shutdown = False
        self.heartbeat = clock()
        threading.Thread(target=self._timer, name="dhad-queue-timer", daemon=True).start()

    def __len__(self) -> int:
        with self._cond:
            return len(self._fresh) + len(self._queue)

    def add(self, key) -> None:
        with self._cond:
            if self._shutdown or key in self._dirty:
                return
            self._dirty.add(key)
            self._added_at[key] = self.clock()
            metrics.QUEUE_ADDS.inc()
            if key in self._processing:
                return  # done() queues it again
            (self._queue if key in self._seen else self._fresh).append(key)
            metrics.QUEUE_DEPTH.set(len(self._fresh) + len(self._queue))
            self._cond.notify()

    def add_after(self, key, delay: float) -> None:
        if delay <= 0:
            self.add(key)
            return
        due = self.clock() + delay
        with self._cond:
            if self._due.get(key, float("inf")) <= due:
                return
            self._due[key] = due
            heapq.heappush(self._delayed, (due, next(self._seq), key))
            self._cond.notify_all()

    def add_rate_limited(self, key) -> float:
        """After an error: again after base_delay * 2^(failures - 1), capped."""
        with self._cond:
            failures = self._failures[key] = self._failures.get(key, 0) + 1
        delay = min(self.base_delay * 2 ** (failures - 1), self.max_delay)
        metrics.QUEUE_RETRIES.inc()
        self.add_after(key, delay)
        return delay

    def forget(self, key) -> None:
        """The key succeeded: its error backoff starts from the base again."""
        with self._cond:
            self._failures.pop(key, None)

    def drop(self, key) -> None:
        """The object is gone: nothing about it stays in the queue's memory."""
        with self._cond:
            self._failures.pop(key, None)
            self._seen.discard(key)
            self._due.pop(key, None)

    def get(self, timeout: float | None = None):
        """The next key (marked in flight), or None after `timeout` seconds with nothing queued."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._fresh or self._queue or self._shutdown, timeout):
                return None
            if self._shutdown:
                return None
            key = (self._fresh or self._queue).popleft()
            now = self.clock()
            self._processing[key] = now
            self._dirty.discard(key)
            self._seen.add(key)
            metrics.QUEUE_LATENCY.observe(now - self._added_at.pop(key, now))
            metrics.QUEUE_DEPTH.set(len(self._fresh) + len(self._queue))
            return key

    def done(self, key) -> None:
        with self._cond:
            self._processing.pop(key, None)
            if key in self._dirty:
                self._queue.append(key)
                self._cond.notify()

    def longest_running(self) -> float:
        with self._cond:
            return max((self.clock() - t for t in self._processing.values()), default=0.0)

    def shutdown(self) -> None:
        with self._cond:
            self._shutdown = True
            self._cond.notify_all()

    def _timer(self) -> None:
        while True:
            with self._cond:
                self.heartbeat = self.clock()
                if self._shutdown:
                    return
                now = self.clock()
                ready = []
                while self._delayed and self._delayed[0][0] <= now:
                    due, _, key = heapq.heappop(self._delayed)
                    if self._due.get(key) == due:
                        del self._due[key]
                        ready.append(key)
                wait = min(self._delayed[0][0] - now, 30.0) if self._delayed else 30.0
                if not ready:
                    self._cond.wait(wait)
                    continue
            for key in ready:
                self.add(key)


class CachedSpecs:
    """(kind, name) -> the spec of that job in one namespace, read from the cache when asked (a fromJob
    chain is followed only as far as the plan needs)."""

    def __init__(self, kube: Kube, namespace: str):
        self.kube, self.namespace = kube, namespace

    def get(self, key: tuple[str, str], default=None):
        kind, name = key
        obj = self.kube.cached(kind, self.namespace, name) if kind in JOB_KINDS else None
        return obj.get("spec") if obj else default


class Controller:
    """Reconciles jobs from the caches: observe -> decide -> execute, one key at a time."""

    def __init__(self, kube: Kube, defaults: Defaults, resync_seconds: float = 600.0, workers: int = 8,
                 is_leader=lambda: True, stuck_after: float = 120.0):
        self.kube, self.defaults, self.resync_seconds = kube, defaults, resync_seconds
        self.is_leader, self.stuck_after, self.workers = is_leader, stuck_after, workers
        self.queue = WorkQueue()
        kube.wake = self._wake
        self._specs: dict[tuple[str, int], object] = {}
        self._stopped = False
        self.started = False

    # --- running --------------------------------------------------------------------------------

    def start(self) -> None:
        for i in range(self.workers):
            threading.Thread(target=self._work, name=f"dhad-worker-{i}", daemon=True).start()
        threading.Thread(target=self._resync, name="dhad-resync", daemon=True).start()
        self.started = True

    def stop(self) -> None:
        self._stopped = True
        self.queue.shutdown()

    def wedged(self) -> list[str]:
        """What keeps this replica from making progress (for /healthz)."""
        problems = []
        if self.queue.longest_running() > self.stuck_after:
            problems.append(f"a reconcile has run for over {self.stuck_after:.0f} s")
        if time.monotonic() - self.queue.heartbeat > 90:
            problems.append("the queue's timer stopped")
        return problems

    def enqueue_all(self) -> None:
        """Every job and pipeline, again (on gaining the Lease, and as a safety net every resync_seconds)."""
        for kind in (*JOB_KINDS, PIPELINE):
            for obj in self.kube.stores[kind].all():
                self.queue.add((kind, obj["metadata"]["namespace"], obj["metadata"]["name"]))

    def _resync(self) -> None:
        while not self._stopped:
            time.sleep(self.resync_seconds)
            if self.kube.synced() and self.is_leader():
                self.enqueue_all()

    def _work(self) -> None:
        while not self._stopped:
            if not (self.kube.synced() and self.is_leader()):
                time.sleep(0.1)  # the barrier: no reconcile before every cache has listed, or while standing by
                continue
            key = self.queue.get(timeout=1.0)
            if key is None:
                continue
            try:
                self.reconcile(key)
            except NotLeading:
                self.queue.add(key)  # whoever leads next does it
            except ApiError as error:
                metrics.ERRORS.labels(key[0]).inc()
                delay = self.queue.add_rate_limited(key)
                level = logging.INFO if error.code == 409 else logging.WARNING
                log.log(level, "reconcile: %s; again in %.1f s", error, delay, extra={"job": "/".join(key)})
            except Exception:
                metrics.ERRORS.labels(key[0]).inc()
                delay = self.queue.add_rate_limited(key)
                log.exception("reconcile failed; again in %.1f s", delay, extra={"job": "/".join(key)})
            finally:
                self.queue.done(key)

    # --- one reconcile ----------------------------------------------------------------------------

    def reconcile(self, key: Key) -> None:
        kind, namespace, name = key
        started = time.monotonic()
        obj = self.kube.cached(kind, namespace, name)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            metrics.JOB_STATES.set(kind, namespace, name, None)  # a pipeline's jobs go with it (garbage collector)
            self.queue.drop(key)
            return
        if kind == PIPELINE:
            self.reconcile_pipeline(key, obj, started)
            return
        try:
            observed = self.observe(obj)
            refused = self.kube.refused_in_background(obj["metadata"]["uid"])
            self._note_refusals(observed, refused)
            now = now_utc()
            plan = decide(obj, observed, now, self.defaults)
            rejected = self.kube.execute(obj, plan, rfc3339(now))
            if rejected or refused:  # decide again knowing what the apiserver refused (a condition, an event)
                if rejected:
                    self._note_refusals(observed, rejected)
                    plan = decide(obj, observed, now, self.defaults)
                    self.kube.execute(obj, plan, rfc3339(now))
                if plan.status.get("state") != "Failed":
                    self.queue.add_rate_limited(key)  # a transient refusal: try again later
                    return
        finally:
            metrics.RECONCILE_SECONDS.labels(kind).observe(time.monotonic() - started)
        if plan.restart_reason:
            metrics.RESTARTS.labels(kind, plan.restart_reason).inc()
        metrics.JOB_STATES.set(kind, namespace, name, plan.status.get("state"), plan.status)
        self.queue.forget(key)
        if plan.requeue_after is not None:
            self.queue.add_after(key, plan.requeue_after + 0.05)  # status times are whole seconds

    def _note_refusals(self, observed: Observed, rejected: dict) -> None:
        """What the apiserver refused, as decide() reads it: a name held by another owner, or a rejection."""
        for child, rejection in rejected.items():
            if rejection.code == 409:
                gone = rejection.owner_ref[0] in JOB_KINDS and self.kube.job_by_uid(rejection.owner_ref[1]) is None
                observed.foreign[child] = Foreign(rejection.owner, gone)
            else:
                observed.rejected[child] = rejection

    def _wake(self, key: Key, failed: bool) -> None:
        """A background create of this job's was refused (decide now) or not answered (try again later)."""
        if failed:
            self.queue.add_rate_limited(key)
        else:
            self.queue.add(key)

    def reconcile_pipeline(self, key: Key, obj: dict, started: float) -> None:
        """observe -> pipeline.decide -> execute; a refused create is decided again knowing who holds the
        name (an event) or why the apiserver refused (an event, and a later try)."""
        kind, namespace, name = key
        try:
            observed = self.observe_pipeline(obj)
            now = now_utc()
            plan = pipelines.decide(obj, observed, now, self.defaults)
            rejected = self.kube.execute_pipeline(obj, plan, rfc3339(now))
            if rejected:
                obj = self.kube.cached(kind, namespace, name) or obj  # our status write is in the cache
                observed = self.observe_pipeline(obj)
                for child, rejection in rejected.items():
                    if rejection.code == 409:
                        observed.taken[child] = rejection.owner or rejection.message
                    else:
                        observed.rejected[child] = rejection.message
                plan = pipelines.decide(obj, observed, now, self.defaults)
                self.kube.execute_pipeline(obj, plan, rfc3339(now))
        finally:
            metrics.RECONCILE_SECONDS.labels(kind).observe(time.monotonic() - started)
        state = plan.status.get("state")
        metrics.JOB_STATES.set(kind, namespace, name, state, {k: v for k, v in plan.status.items() if k != "progress"})
        self.queue.forget(key)
        if plan.requeue_after is not None:
            self.queue.add_after(key, plan.requeue_after)

    def observe_pipeline(self, obj: dict) -> pipelines.PipelineObserved:
        """The pipeline's world from the caches: the Dhad jobs it controls (by owner UID) and the step cache."""
        meta = obj["metadata"]
        children = [child for kind in sorted(JOB_KINDS) for child in self.kube.owned(kind, meta["uid"])]
        return pipelines.PipelineObserved(children=children, cache=self.kube.step_cache(meta["namespace"]))

    def _spec(self, obj: dict):
        meta = obj["metadata"]
        cache_key = (meta["uid"], meta.get("generation") or 0)
        if cache_key not in self._specs:
            if len(self._specs) > 10_000:
                self._specs.clear()
            try:
                self._specs[cache_key] = parse_spec(obj["kind"], obj["spec"])
            except ValueError:
                self._specs[cache_key] = None
        return self._specs[cache_key]

    def observe(self, obj: dict) -> Observed:
        """This job's world, from the caches only."""
        kube, meta = self.kube, obj["metadata"]
        kind, namespace, name, uid = obj["kind"], meta["namespace"], meta["name"], meta["uid"]
        jobs = kube.owned("Job", uid)
        pods = [p for j in jobs for p in kube.owned("Pod", j["metadata"]["uid"])]
        children = {(k, c["metadata"]["name"]) for k in STATIC_KINDS for c in kube.owned(k, uid) if not c["metadata"].get("deletionTimestamp")}
        foreign = {}
        for k in ("Job", *STATIC_KINDS):
            for child in kube.labelled(k, namespace, kind, name):
                if observe.controller_uid(child) != uid:
                    foreign[(k, child["metadata"]["name"])] = Foreign(owner_description(k, child), self._owner_gone(child))
        shared = set()
        for k, n in namespace_child_names():  # no job owns these: ours by their label
            if (found := kube.cached(k, namespace, n)) is None:
                continue
            deleting = bool(found["metadata"].get("deletionTimestamp"))
            if not managed_by_us(found):
                foreign[(k, n)] = Foreign(owner_description(k, found), owner_gone=deleting)
            elif not deleting:
                shared.add((k, n))
        progress_cm = kube.cached("ConfigMap", namespace, progress_config_map_name(Owner(kind, name, namespace, uid)))
        progress = progress_cm.get("progress") if progress_cm and observe.controller_uid(progress_cm) == uid else None
        spec = self._spec(obj)
        refs = {(k, n): kube.cached(k, namespace, n) for k, n in references(spec)} if spec is not None else {}
        errors = {j["metadata"]["uid"]: message for j in jobs if (message := kube.pod_create_errors(j["metadata"]["uid"]))}
        planning = not (obj.get("status") or {}).get("startTime")  # Planned is checked until the job starts
        return Observed(jobs=jobs, pods=pods, progress=progress, references=refs, children=children, shared=shared,
                        labelled_pods=kube.labelled("Pod", namespace, kind, name), foreign=foreign, pod_errors=errors,
                        nodes=kube.node_labels() if planning else [], job_specs=CachedSpecs(kube, namespace))

    def _owner_gone(self, child: dict) -> bool:
        """True when the child's controller is a Dhad job that no longer exists (the GC will remove it)."""
        ref = next((r for r in child["metadata"].get("ownerReferences") or [] if r.get("controller")), None)
        return bool(ref) and ref.get("kind") in JOB_KINDS and self.kube.job_by_uid(ref.get("uid")) is None
