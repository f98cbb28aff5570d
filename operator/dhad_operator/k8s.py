"""The one module that talks to the Kubernetes API: watch caches, writes, the Lease.

Reads come from watch caches: every resource the reconcile needs is listed once, then watched from
that resourceVersion (bookmarks on, relist on 410 Gone), as raw JSON (no model classes: they cost
more CPU than the rest of a reconcile), cut to what `decide()` reads (observe.slim) and kept in a
Store indexed by controller owner UID and by the job labels. A reconcile makes no read request.

Writes go to the API with a client and a server timeout shorter than the leader's Lease, through a
gate that is shut while this replica does not lead. Their responses go into the Store at once (the
newest resourceVersion wins), so the next reconcile sees our own writes without waiting for the watch.
A create that meets an existing object never counts as success: who owns it decides (ours: it was a
lost response; anyone else's: the reconcile reports a name collision). Jobs are deleted with
Foreground propagation, so a Job stays visible until its pods are gone.

Why our own informers and not kopf's (its indexes and `when=` filters were weighed): the reconcile
runs in worker threads, and kopf's indexes are mutated on its asyncio loop, with no signal that
every resource has listed (readiness needs one); kopf's per-object workers cost CPU per event that a
dict update does not; and we need neither its handler state nor its peering. The watch loop is small.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections import OrderedDict, defaultdict
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from urllib.parse import quote, urlencode

import urllib3

from dhad_api.jobs import API_VERSION, KINDS
from dhad_api.pipeline import ANNOTATION_RETRY, LABEL_CACHE
from dhad_api.pipeline import KIND as PIPELINE
from dhad_api.pipeline import PLURAL as PIPELINES
from dhad_operator import observe
from dhad_operator.observe import STEP_CACHE
from dhad_operator.pipeline import PipelinePlan
from dhad_operator.reconcile import Plan, Rejection
from dhad_operator.render import (
    LABEL_JOB,
    LABEL_KIND,
    managed_by_us,
    namespace_child_names,
    needed_before_the_job,
)

log = logging.getLogger("dhad.k8s")
JOB_KINDS = frozenset(info.kind.value for info in KINDS.values())


@dataclass(frozen=True)
class Resource:
    kind: str
    api_version: str  # "v1", "batch/v1", "dhad.dev/v1alpha1"
    plural: str

    def path(self, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        parts = [base] + ([f"namespaces/{namespace}"] if namespace else []) + [self.plural]
        parts += [quote(name)] if name else []
        parts += [sub] if sub else []
        return "/".join(parts)


RESOURCES: dict[str, Resource] = {
    **{info.kind.value: Resource(info.kind.value, API_VERSION, info.plural) for info in KINDS.values()},
    "Job": Resource("Job", "batch/v1", "jobs"),
    "Pod": Resource("Pod", "v1", "pods"),
    "ConfigMap": Resource("ConfigMap", "v1", "configmaps"),
    "Service": Resource("Service", "v1", "services"),
    "ServiceAccount": Resource("ServiceAccount", "v1", "serviceaccounts"),
    "Role": Resource("Role", "rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": Resource("RoleBinding", "rbac.authorization.k8s.io/v1", "rolebindings"),
    "Event": Resource("Event", "v1", "events"),
    "Lease": Resource("Lease", "coordination.k8s.io/v1", "leases"),
    "Node": Resource("Node", "v1", "nodes"),
    PIPELINE: Resource(PIPELINE, API_VERSION, PIPELINES),
    STEP_CACHE: Resource(STEP_CACHE, "v1", "configmaps"),  # ConfigMaps labelled dhad.dev/cache, cached apart
}
CHILD_KINDS = ("Job", "Pod", "ConfigMap", "Service", "ServiceAccount", "Role", "RoleBinding")
CHILD_SELECTOR = {"labelSelector": f"{LABEL_JOB},{LABEL_KIND}"}
# Services: only the namespace's worker Service, by name, so that one someone else made is seen too.
(SHARED_SERVICE,) = [name for kind, name in namespace_child_names() if kind == "Service"]
SELECTORS = {"Service": {"fieldSelector": f"metadata.name={SHARED_SERVICE}"}}
# The Job controller's "cannot create pods" events (Pod Security, quota): how admission errors reach the job.
POD_CREATE_EVENTS = {"fieldSelector": "involvedObject.kind=Job,reason=FailedCreate"}
# GPU nodes (GPU feature discovery's label): their labels give the Planned condition the GPU's memory.
GPU_NODES = {"labelSelector": "nvidia.com/gpu.present=true"}
# The step cache: ConfigMaps owned by no job (they outlive pipelines), so CHILD_SELECTOR misses them.
STEP_CACHE_SELECTOR = {"labelSelector": LABEL_CACHE}
MERGE_PATCH = "application/merge-patch+json"


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str):
        super().__init__(f"{code} {reason}: {message}")
        self.code, self.reason, self.message = code, reason, message


class NotLeading(Exception):
    """A write was attempted while this replica does not hold the Lease."""


class Gone(Exception):
    """The watch's resourceVersion is too old: list again."""


def _version(obj: dict | None) -> int:
    try:
        return int(((obj or {}).get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:  # etcd's are integers; any other storage: accept every event as newer
        return 0


class Rest:
    """JSON over the kubernetes client's connection pool and credentials, every request timed out."""

    def __init__(self, api_client, timeout: float, on_request=None):
        self.configuration = api_client.configuration
        self.pool = api_client.rest_client.pool_manager
        self.host = self.configuration.host.rstrip("/")
        self.timeout = timeout
        self.on_request = on_request or (lambda verb: None)

    def _headers(self, content_type: str | None = None) -> dict:
        headers = {"Accept": "application/json", "User-Agent": "dhad-operator"}
        token = (self.configuration.auth_settings().get("BearerToken") or {}).get("value")
        if token:
            headers["Authorization"] = token
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    def request(self, method: str, path: str, query: dict | None = None, body=None, verb: str | None = None,
                timeout: float | None = None, content_type: str = "application/json") -> dict:
        timeout = timeout or self.timeout
        query = {**(query or {}), "timeout": f"{max(int(timeout), 1)}s"}  # the apiserver gives up too
        data = json.dumps(body, separators=(",", ":")).encode() if body is not None else None
        self.on_request(verb or method.lower())
        try:
            response = self.pool.request(method, f"{self.host}{path}?{urlencode(query)}", body=data,
                                         headers=self._headers(content_type if data else None),
                                         timeout=urllib3.Timeout(connect=timeout, read=timeout), retries=False)
        except urllib3.exceptions.HTTPError as error:
            raise ApiError(0, "Unreachable", str(error)) from error
        return _decode(response.status, response.reason, response.data)

    def watch(self, path: str, query: dict, read_timeout: float):
        """Yields the watch's events (dicts) until the server ends the stream."""
        self.on_request("watch")
        try:
            response = self.pool.request("GET", f"{self.host}{path}?{urlencode(query)}", headers=self._headers(),
                                         timeout=urllib3.Timeout(connect=self.timeout, read=read_timeout),
                                         retries=False, preload_content=False)
        except urllib3.exceptions.HTTPError as error:
            raise ApiError(0, "Unreachable", str(error)) from error
        try:
            if response.status >= 400:
                _decode(response.status, response.reason, response.read())
            pending = b""
            for chunk in response.stream(64 * 1024):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield json.loads(line)
        finally:
            response.release_conn()


def _decode(status: int, reason: str, data: bytes) -> dict:
    try:
        payload = json.loads(data) if data else {}
    except ValueError:
        payload = {"message": data[:500].decode(errors="replace")}
    if status >= 400:
        raise ApiError(status, payload.get("reason") or reason or "", payload.get("message") or "")
    return payload


class Store:
    """One resource's cache: slim objects by (namespace, name), indexed by their own UID, by their
    controller's UID, and by the job labels. Cached objects are never mutated, only replaced."""

    def __init__(self, kind: str, owner_of=observe.controller_uid):
        self.kind, self.owner_of = kind, owner_of
        self._lock = threading.Lock()
        self._objects: dict[tuple[str, str], dict] = {}
        self._by_uid: dict[str, tuple[str, str]] = {}
        self._by_owner: dict[str, set] = defaultdict(set)
        self._by_job: dict[tuple[str, str, str], set] = defaultdict(set)
        self._gone: OrderedDict[tuple[str, str], int] = OrderedDict()  # so a late write cannot resurrect

    @staticmethod
    def _key(obj: dict) -> tuple[str, str]:
        meta = obj["metadata"]
        return meta.get("namespace") or "", meta["name"]

    @staticmethod
    def _job_key(obj: dict) -> tuple[str, str, str] | None:
        meta = obj["metadata"]
        labels = meta.get("labels") or {}
        return (meta.get("namespace") or "", labels[LABEL_KIND], labels[LABEL_JOB]) if LABEL_JOB in labels and LABEL_KIND in labels else None

    def _index(self, key, obj, add: bool) -> None:
        uid, owner, job = obj["metadata"].get("uid"), self.owner_of(obj), self._job_key(obj)
        if add:
            if uid:
                self._by_uid[uid] = key
            if owner:
                self._by_owner[owner].add(key)
            if job:
                self._by_job[job].add(key)
            return
        if uid and self._by_uid.get(uid) == key:
            del self._by_uid[uid]
        if owner:
            self._by_owner[owner].discard(key)
            if not self._by_owner[owner]:
                del self._by_owner[owner]
        if job:
            self._by_job[job].discard(key)
            if not self._by_job[job]:
                del self._by_job[job]

    def put(self, obj: dict) -> tuple[dict | None, dict] | None:
        """Stores obj unless what is cached (or its deletion) is newer; returns (old, new) if stored."""
        key = self._key(obj)
        with self._lock:
            old = self._objects.get(key)
            if _version(obj) and (_version(obj) <= _version(old) or _version(obj) <= self._gone.get(key, 0)):
                return None
            if old is not None:
                self._index(key, old, add=False)
            self._objects[key] = obj
            self._gone.pop(key, None)
            self._index(key, obj, add=True)
            return old, obj

    def remove(self, obj: dict) -> tuple[dict, None] | None:
        key = self._key(obj)
        with self._lock:
            self._gone[key] = max(_version(obj), self._gone.get(key, 0))
            while len(self._gone) > 10_000:
                self._gone.popitem(last=False)
            old = self._objects.pop(key, None)
            if old is None:
                return None
            self._index(key, old, add=False)
            return old, None

    def replace(self, objs: list[dict], namespace: str | None) -> list[tuple[dict | None, dict | None]]:
        """After a (re)list of one namespace (None: all): the differences, as events."""
        fresh = {self._key(o): o for o in objs}
        changes = []
        with self._lock:
            scope = [k for k in self._objects if namespace is None or k[0] == namespace]
            for key in scope:
                if key not in fresh:
                    old = self._objects.pop(key)
                    self._index(key, old, add=False)
                    changes.append((old, None))
            for key, obj in fresh.items():
                old = self._objects.get(key)
                if old is not None:
                    if _version(old) >= _version(obj) and _version(obj):
                        continue
                    self._index(key, old, add=False)
                self._objects[key] = obj
                self._index(key, obj, add=True)
                changes.append((old, obj))
            self._gone.clear()
        return changes

    def get(self, namespace: str, name: str) -> dict | None:
        with self._lock:
            return self._objects.get((namespace, name))

    def by_uid(self, uid: str) -> dict | None:
        with self._lock:
            key = self._by_uid.get(uid)
            return self._objects.get(key) if key else None

    def owned_by(self, uid: str) -> list[dict]:
        with self._lock:
            return [self._objects[k] for k in self._by_owner.get(uid, ())]

    def labelled(self, namespace: str, kind: str, name: str) -> list[dict]:
        with self._lock:
            return [self._objects[k] for k in self._by_job.get((namespace, kind, name), ())]

    def all(self) -> list[dict]:
        with self._lock:
            return list(self._objects.values())

    def __len__(self) -> int:
        return len(self._objects)


class Informer:
    """List, then watch, one resource in one namespace (or all) into a Store; calls on_change(kind,
    old, new) for every stored difference (new is None for a deletion)."""

    def __init__(self, rest: Rest, resource: Resource, store: Store, namespace: str | None, selector: dict, on_change,
                 watch_seconds: int = 300, optional: bool = False):
        self.rest, self.resource, self.store, self.namespace, self.optional = rest, resource, store, namespace, optional
        self.selector, self.on_change, self.watch_seconds = selector, on_change, watch_seconds
        self.synced = threading.Event()
        self.heartbeat = time.monotonic()
        self.stopped = False
        self.name = f"{resource.kind}/{namespace or '*'}"

    def start(self) -> None:
        threading.Thread(target=self._run, name=f"dhad-watch-{self.name}", daemon=True).start()

    def stalled_for(self) -> float:
        return time.monotonic() - self.heartbeat

    def _slim(self, obj: dict) -> dict:
        return observe.slim(self.resource.kind, {"kind": self.resource.kind, "apiVersion": self.resource.api_version, **obj}, JOB_KINDS)

    def _emit(self, changes) -> None:
        for old, new in changes:
            try:
                self.on_change(self.resource.kind, old, new)
            except Exception:  # noqa: BLE001 - one bad event must not stop the watch
                log.exception("event handler failed for %s", self.name)

    def _run(self) -> None:
        version, backoff = None, 0.5
        while not self.stopped:
            self.heartbeat = time.monotonic()
            try:
                if version is None:
                    version = self._list()
                    self.synced.set()
                version = self._watch(version)
                backoff = 0.5
            except Gone:
                version = None
            except (ApiError, OSError, ValueError, urllib3.exceptions.HTTPError) as error:
                if isinstance(error, ApiError) and error.code == 410:
                    version = None
                    continue
                if isinstance(error, ApiError) and error.code == 403 and self.optional and not self.synced.is_set():
                    log.error("may not watch %s (%s): the operator runs without it", self.name, error.message)
                    self.synced.set()  # not needed to serve; retried below
                    backoff = 300
                log.warning("watch %s: %s; again in %.1f s", self.name, error, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 30) if backoff < 30 else backoff

    def _list(self) -> str:
        items, token = [], None
        while True:
            query = {**self.selector, "limit": "500", **({"continue": token} if token else {})}
            page = self.rest.request("GET", self.resource.path(self.namespace), query, verb="list", timeout=max(self.rest.timeout, 30))
            items += page.get("items") or []
            token = (page.get("metadata") or {}).get("continue")
            self.heartbeat = time.monotonic()
            if not token:
                break
        self._emit(self.store.replace([self._slim(i) for i in items], self.namespace))
        return page["metadata"]["resourceVersion"]

    def _watch(self, version: str) -> str:
        seconds = random.randint(int(self.watch_seconds * 0.8), self.watch_seconds)
        query = {**self.selector, "watch": "1", "allowWatchBookmarks": "true", "resourceVersion": version, "timeoutSeconds": str(seconds)}
        for event in self.rest.watch(self.resource.path(self.namespace), query, read_timeout=seconds + 30):
            self.heartbeat = time.monotonic()
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                if obj.get("code") == 410:
                    raise Gone()
                raise ApiError(obj.get("code") or 0, obj.get("reason") or "", obj.get("message") or "")
            version = (obj.get("metadata") or {}).get("resourceVersion") or version
            if kind == "BOOKMARK":
                continue
            slimmed = self._slim(obj)
            change = self.store.remove(slimmed) if kind == "DELETED" else self.store.put(slimmed)
            if change:
                self._emit([change])
        return version


def owner_description(kind: str, obj: dict) -> str:
    ref = next((r for r in (obj.get("metadata") or {}).get("ownerReferences") or [] if r.get("controller")), None)
    return f"{ref.get('kind')} {ref.get('name')} (uid {ref.get('uid')})" if ref else "no owner"


class Kube:
    """The caches and the writes of one operator process."""

    def __init__(self, rest: Rest, namespaces: list[str] | None = None, may_write=lambda: True, crash: str | None = None,
                 write_threads: int = 16):
        self.rest = rest
        self.namespaces = list(namespaces or [])
        self.may_write = may_write
        self.stores = {kind: Store(kind) for kind in (*JOB_KINDS, *CHILD_KINDS, PIPELINE, STEP_CACHE)}
        self.stores["Event"] = Store("Event", owner_of=lambda e: (e.get("involvedObject") or {}).get("uid"))
        self.stores["Node"] = Store("Node", owner_of=lambda n: None)
        self.informers: list[Informer] = []
        self._on_change = None
        self._writers = ThreadPoolExecutor(write_threads, thread_name_prefix="dhad-write")
        # Events and the children a Job's pods start without: two threads, so in a burst of new jobs
        # they take little of the apiserver from the writes that make Jobs.
        self._background = ThreadPoolExecutor(2, thread_name_prefix="dhad-background")
        self._in_flight: set[tuple[str, str, str]] = set()  # (kind, namespace, name) of background creates
        self._refused: dict[str, dict[tuple[str, str], Rejection]] = defaultdict(dict)  # owner UID -> refused background creates
        self._background_lock = threading.Lock()
        self.wake = lambda key, failed: None  # (job kind, namespace, name), failed: the controller's to requeue
        # A test hook for the chaos test: "after-writes:N" exits (137) once N writes are done,
        # "in-status:N" exits with the N-th status write sent and its answer unread.
        self._crash = (crash.split(":")[0], int(crash.split(":")[1])) if crash else None
        self._counts = {"after-writes": 0, "in-status": 0}
        self._counts_lock = threading.Lock()

    # --- caches ---------------------------------------------------------------------------------

    def start(self, on_change) -> None:
        """One informer per watched resource and namespace; on_change(kind, old, new) on each change,
        and on_change(..., ours=True) for what our own writes stored."""
        self._on_change = on_change
        scopes = self.namespaces or [None]
        selectors = {**dict.fromkeys((*JOB_KINDS, PIPELINE), {}), "Event": POD_CREATE_EVENTS,
                     STEP_CACHE: STEP_CACHE_SELECTOR, **SELECTORS}
        for kind in (*sorted(JOB_KINDS), PIPELINE, *CHILD_KINDS, STEP_CACHE, "Event"):
            selector = selectors.get(kind, CHILD_SELECTOR)
            for namespace in scopes:
                self.informers.append(Informer(self.rest, RESOURCES[kind], self.stores[kind], namespace, selector, on_change,
                                               optional=kind == "Event"))
        # Nodes are cluster-wide; optional like Events: without the permission the plan uses plan.gpuMemory
        # or the nodeSelector's GPU product, else says Unknown.
        self.informers.append(Informer(self.rest, RESOURCES["Node"], self.stores["Node"], None, GPU_NODES, on_change, optional=True))
        for informer in self.informers:
            informer.start()

    def synced(self) -> bool:
        return bool(self.informers) and all(i.synced.is_set() for i in self.informers)

    def stalled(self, limit: float) -> list[str]:
        """Informers whose loop has not moved for `limit` seconds (a watch's read times out well before)."""
        return [i.name for i in self.informers if i.stalled_for() > limit]

    def cached(self, kind: str, namespace: str, name: str) -> dict | None:
        return self.stores[kind].get(namespace, name)

    def job_by_uid(self, uid: str) -> dict | None:
        for kind in JOB_KINDS:
            if found := self.stores[kind].by_uid(uid):
                return found
        return None

    def owned(self, kind: str, uid: str) -> list[dict]:
        return self.stores[kind].owned_by(uid)

    def step_cache(self, namespace: str) -> list[dict]:
        """The step-cache ConfigMaps of one namespace (a pipeline reuses any of them)."""
        return [cm for cm in self.stores[STEP_CACHE].all() if cm["metadata"].get("namespace") == namespace]

    def labelled(self, kind: str, namespace: str, job_kind: str, job: str) -> list[dict]:
        return self.stores[kind].labelled(namespace, job_kind, job)

    def node_labels(self) -> list[dict[str, str]]:
        """The labels of every GPU node, from the cache."""
        return [n["metadata"].get("labels") or {} for n in self.stores["Node"].all()]

    def pod_create_errors(self, job_uid: str) -> str | None:
        """The Job controller's latest FailedCreate message for a Job."""
        events = self.stores["Event"].owned_by(job_uid)
        return max(events, key=_version)["message"] if events else None

    def _remember(self, kind: str, obj: dict) -> None:
        if not obj.get("metadata", {}).get("name"):
            return
        change = self.stores[kind].put(observe.slim(kind, obj, JOB_KINDS))
        if change and self._on_change:
            self._on_change(kind, *change, ours=True)

    # --- writes -----------------------------------------------------------------------------------

    def _write(self, method: str, path: str, body=None, query=None, verb: str = "", content_type: str = "application/json") -> dict:
        if not self.may_write():
            raise NotLeading()
        if self._crash and self._count("in-status" if path.endswith("/status") else None):
            log.warning("test hook: exiting with a status write in flight (%s)", path)
            try:
                self.rest.request(method, path, query, body, verb=verb, timeout=0.05)
            finally:
                os._exit(137)
        result = self.rest.request(method, path, query, body, verb=verb, content_type=content_type)
        self._written(f"{method} {path}")
        return result

    def _written(self, what: str) -> None:
        """The test hook's "after-writes" moment counts the writes that took effect."""
        if self._crash and self._count("after-writes"):
            log.warning("test hook: exiting after a write (%s)", what)
            os._exit(137)

    def _count(self, what: str | None) -> bool:
        """True when the test hook's moment has come."""
        if what is None or self._crash[0] != what:
            return False
        with self._counts_lock:
            self._counts[what] += 1
            return self._counts[what] >= self._crash[1]

    def create(self, manifest: dict, owner_uid: str | None, cached_as: str | None = None) -> Rejection | None:
        """Creates one child; a name held by another owner comes back as a 409 Rejection. `cached_as`:
        the store that keeps it when not its kind's (a step-cache ConfigMap)."""
        kind, meta = manifest["kind"], manifest["metadata"]
        resource = RESOURCES[kind]
        try:
            self._remember(cached_as or kind, self._write("POST", resource.path(meta["namespace"]), manifest, verb="create"))
            return None
        except ApiError as error:
            if error.code == 0 or error.code == 429 or error.code >= 500:
                raise  # the API is unwell, not the child: the queue backs off
            if error.code != 409:
                return Rejection(error.code, error.message)
        existing = self.read(kind, meta["namespace"], meta["name"])  # only here does a reconcile read
        if existing is None:
            raise ApiError(409, "Conflict", f"{kind} {meta['name']} existed a moment ago")  # try again
        if meta.get("ownerReferences"):
            ours = observe.controller_uid(existing) == owner_uid
        elif cached_as == STEP_CACHE:  # a step-cache entry no one owns, named by its content's key
            ours = observe.controller_uid(existing) is None
        else:  # a namespace object no job owns: ours by its label (another job just made it)
            ours = managed_by_us(existing)
        if ours:
            self._remember(cached_as or kind, existing)  # ours: the answer to an earlier create was lost
            self._written(f"POST {resource.path(meta['namespace'])} (409: an earlier try, its answer lost, made it)")
            return None
        ref = next((r for r in existing["metadata"].get("ownerReferences") or [] if r.get("controller")), {})
        return Rejection(409, f"{kind} {meta['name']} exists", owner_description(kind, existing), (ref.get("kind"), ref.get("uid")))

    def read(self, kind: str, namespace: str, name: str) -> dict | None:
        try:
            obj = self.rest.request("GET", RESOURCES[kind].path(namespace, name), verb="get")
        except ApiError as error:
            if error.code == 404:
                return None
            raise
        return {"kind": kind, **obj}

    def delete(self, kind: str, namespace: str, name: str, propagation: str = "Background") -> None:
        try:
            result = self._write("DELETE", RESOURCES[kind].path(namespace, name),
                                 {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation}, verb="delete")
        except ApiError as error:
            if error.code != 404:
                raise
            return
        if (result.get("metadata") or {}).get("deletionTimestamp"):
            self._remember(kind, {"kind": kind, **result})  # still there until its dependents are gone
        elif (cached := self.stores[kind].get(namespace, name)) is not None:
            self.stores[kind].remove(cached)  # gone now: the next reconcile must not delete it again

    def patch(self, kind: str, namespace: str, name: str, patch: dict) -> None:
        """A JSON merge patch (a stage job's spec.suspend, a Pipeline's handled retry annotation); gone is done."""
        try:
            result = self._write("PATCH", RESOURCES[kind].path(namespace, name), patch, verb="patch", content_type=MERGE_PATCH)
        except ApiError as error:
            if error.code != 404:
                raise
            return
        self._remember(kind, result)

    def replace_status(self, obj: dict, status: dict) -> dict:
        """PUT of /status with the cached resourceVersion: removed keys go, a stale write gets a 409."""
        meta = obj["metadata"]
        body = {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "status": status,
                "metadata": {"name": meta["name"], "namespace": meta["namespace"], "resourceVersion": meta["resourceVersion"]}}
        result = self._write("PUT", RESOURCES[obj["kind"]].path(meta["namespace"], meta["name"], "status"), body, verb="update")
        self._remember(obj["kind"], result)
        return result

    def post_event(self, obj: dict, type_: str, reason: str, message: str, now_text: str) -> None:
        """Events are for people: posted off the reconcile's path, never failing it."""
        meta = obj["metadata"]
        body = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta["uid"]},
            "type": type_, "reason": str(reason)[:128], "message": message[:1024],
            "source": {"component": "dhad-operator"}, "firstTimestamp": now_text, "lastTimestamp": now_text, "count": 1,
        }

        def post():
            try:
                if self.may_write():
                    self.rest.request("POST", RESOURCES["Event"].path(meta["namespace"]), None, body, verb="create")
            except ApiError as error:
                log.warning("event not recorded: %s", error)

        self._background.submit(post)

    def execute(self, obj: dict, plan: Plan, now_text: str) -> dict[tuple[str, str], Rejection]:
        """Creates of what the Job's pods need (together; the Job after its pods' ServiceAccount), then the
        rest in the background, then status, then deletes, then events. A refused create stops there: the
        reconcile decides again knowing why."""
        ns, uid = obj["metadata"]["namespace"], obj["metadata"]["uid"]
        if plan.create:
            rejected = self._create_all([m for m in plan.create if needed_before_the_job(m)], uid)
            if rejected:
                return rejected
            for manifest in plan.create:
                if not needed_before_the_job(manifest):
                    self._create_in_background(manifest, uid)
        if plan.status != (obj.get("status") or {}):
            self.replace_status(obj, plan.status)
        deletes = [("Job", name, "Foreground") for name in plan.delete_jobs] + [(k, n, "Background") for k, n in plan.delete_children]
        for future in [self._writers.submit(self.delete, kind, ns, name, how) for kind, name, how in deletes]:
            future.result()
        for type_, reason, message in plan.events:
            self.post_event(obj, type_, reason, message, now_text)
        return {}

    def _create_all(self, manifests: list[dict], owner_uid: str) -> dict[tuple[str, str], Rejection]:
        first = [m for m in manifests if m["kind"] != "Job"]
        futures = {self._writers.submit(self.create, m, owner_uid): m for m in first}
        accounts = [f for f, m in futures.items() if m["kind"] == "ServiceAccount"]
        wait(accounts)
        rejected = {(m["kind"], m["metadata"]["name"]): r for f, m in futures.items() if f in accounts and (r := f.result())}
        if not rejected:
            futures.update({self._writers.submit(self.create, m, owner_uid): m for m in manifests if m["kind"] == "Job"})
        for future, manifest in futures.items():
            if rejection := future.result():
                rejected[(manifest["kind"], manifest["metadata"]["name"])] = rejection
        return rejected

    def _create_in_background(self, manifest: dict, owner_uid: str) -> None:
        """Creates a child off the reconcile's path; the job is woken if the apiserver refused it (the
        next reconcile takes the refusal from refused_in_background) or could not answer (with backoff)."""
        meta = manifest["metadata"]
        child = (manifest["kind"], meta["namespace"], meta["name"])
        owner = next(r for r in meta["ownerReferences"] if r.get("controller"))
        key = (owner["kind"], meta["namespace"], owner["name"])
        with self._background_lock:
            if child in self._in_flight:
                return
            self._in_flight.add(child)

        def create():
            failed = refused = False
            try:
                if rejection := self.create(manifest, owner_uid):
                    with self._background_lock:
                        self._refused[owner_uid][(child[0], child[2])] = rejection
                    refused = True
            except NotLeading:
                pass  # whoever leads makes it
            except Exception as error:  # noqa: BLE001 - the API is unwell: the job tries again with backoff
                log.warning("%s %s not created: %s", child[0], child[2], error, extra={"job": "/".join(key)})
                failed = True
            finally:
                with self._background_lock:
                    self._in_flight.discard(child)
            if refused or failed:
                self.wake(key, failed)

        self._background.submit(create)

    def refused_in_background(self, owner_uid: str) -> dict[tuple[str, str], Rejection]:
        """What the apiserver refused of this job's background creates since the last call."""
        with self._background_lock:
            return self._refused.pop(owner_uid, {})

    def execute_pipeline(self, obj: dict, plan: PipelinePlan, now_text: str) -> dict[str, Rejection]:
        """Status first (the retry records name the jobs created next, so they survive a crash), then deletes
        of the stage jobs no longer wanted, suspend patches, creates (stage jobs owned by the pipeline; step
        cache ConfigMaps owned by nobody), the retry annotation, events. Refused creates by name."""
        meta = obj["metadata"]
        ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
        if plan.status != (obj.get("status") or {}):
            self.replace_status(obj, plan.status)
        writes = [self._writers.submit(self.delete, kind, ns, child, "Background") for kind, child in plan.delete]
        writes += [self._writers.submit(self.patch, kind, ns, child, {"spec": {"suspend": suspend}}) for kind, child, suspend in plan.suspend]
        for future in writes:
            future.result()
        creates = {m["metadata"]["name"]: self._writers.submit(self.create, m, *((None, STEP_CACHE) if m["kind"] == "ConfigMap" else (uid,)))
                   for m in plan.create}
        rejected = {child: rejection for child, future in creates.items() if (rejection := future.result())}
        if plan.remove_retry_annotation:
            self.patch(PIPELINE, ns, name, {"metadata": {"annotations": {ANNOTATION_RETRY: None}}})
        for type_, reason, message in plan.events:
            self.post_event(obj, type_, reason, message, now_text)
        return rejected

    # --- the Lease (never gated: it is how this replica learns whether it may write) ---------------

    def read_lease(self, namespace: str, name: str) -> dict | None:
        try:
            return self.rest.request("GET", RESOURCES["Lease"].path(namespace, name), verb="lease")
        except ApiError as error:
            if error.code == 404:
                return None
            raise

    def write_lease(self, namespace: str, body: dict, create: bool) -> dict:
        resource = RESOURCES["Lease"]
        if create:
            return self.rest.request("POST", resource.path(namespace), None, body, verb="lease")
        return self.rest.request("PUT", resource.path(namespace, body["metadata"]["name"]), None, body, verb="lease")
