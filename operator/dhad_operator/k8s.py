"""The one module that talks to the Kubernetes API: read a job and its children, carry out a Plan.

Creates are idempotent (AlreadyExists is success: names are deterministic) and a Job is never
re-applied: its pod template is immutable, so a new attempt is a new Job. Deletes of Jobs use
Foreground propagation, so the Job stays visible until its pods are gone, which is how the reconcile
knows a gang has fully stopped before the next attempt starts.
"""

from __future__ import annotations

import logging
from datetime import datetime

from kubernetes import client
from kubernetes.client.rest import ApiException

from dhad_api.jobs import GROUP, KINDS, VERSION
from dhad_api.references import references
from dhad_operator.reconcile import Observed, Plan, progress_of
from dhad_operator.render import LABEL_JOB, LABEL_KIND, Owner, progress_config_map_name
from dhad_operator.status import rfc3339

log = logging.getLogger("dhad.k8s")
PLURALS = {info.kind.value: info.plural for info in KINDS.values()}


class Kube:
    """Thin typed access to the API for the reconcile; every call is counted for metrics."""

    def __init__(self, api: client.ApiClient, on_request=None):
        self.api = api
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)
        self.rbac = client.RbacAuthorizationV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.on_request = on_request or (lambda verb: None)

    def _dict(self, obj) -> dict:
        return self.api.sanitize_for_serialization(obj)

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        self.on_request("get")
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURALS[kind], name)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def observe(self, obj: dict, spec=None) -> Observed:
        meta = obj["metadata"]
        selector = f"{LABEL_JOB}={meta['name']},{LABEL_KIND}={obj['kind']}"
        ns = meta["namespace"]
        self.on_request("list")
        jobs = [self._dict(j) for j in self.batch.list_namespaced_job(ns, label_selector=selector).items]
        self.on_request("list")
        pods = [self._dict(p) for p in self.core.list_namespaced_pod(ns, label_selector=selector).items]
        owner = Owner(obj["kind"], meta["name"], ns, meta["uid"])
        progress = None
        children_exist = False
        if jobs or obj.get("status", {}).get("attempt"):
            self.on_request("get")
            try:
                cm = self._dict(self.core.read_namespaced_config_map(progress_config_map_name(owner), ns))
                children_exist = True
                progress = progress_of(cm)
            except ApiException as error:
                if error.status != 404:
                    raise
        refs = {}
        if spec is not None:
            for kind, name in references(spec):
                refs[(kind, name)] = self.get(kind, ns, name)
        return Observed(jobs=jobs, pods=pods, progress=progress, references=refs, children_exist=children_exist)

    def create(self, manifest: dict) -> None:
        kind, ns = manifest["kind"], manifest["metadata"]["namespace"]
        creators = {
            "Job": lambda: self.batch.create_namespaced_job(ns, manifest),
            "Service": lambda: self.core.create_namespaced_service(ns, manifest),
            "ConfigMap": lambda: self.core.create_namespaced_config_map(ns, manifest),
            "ServiceAccount": lambda: self.core.create_namespaced_service_account(ns, manifest),
            "Role": lambda: self.rbac.create_namespaced_role(ns, manifest),
            "RoleBinding": lambda: self.rbac.create_namespaced_role_binding(ns, manifest),
        }
        self.on_request("create")
        try:
            creators[kind]()
        except ApiException as error:
            if error.status != 409:
                raise

    def delete_job(self, namespace: str, name: str) -> None:
        self.on_request("delete")
        try:
            self.batch.delete_namespaced_job(name, namespace, propagation_policy="Foreground")
        except ApiException as error:
            if error.status != 404:
                raise

    def delete_children(self, obj: dict) -> None:
        """TTL: every child goes (pods via the Jobs), the job object stays."""
        ns = obj["metadata"]["namespace"]
        selector = f"{LABEL_JOB}={obj['metadata']['name']},{LABEL_KIND}={obj['kind']}"
        for lister, deleter in (
            (self.batch.list_namespaced_job, lambda n: self.batch.delete_namespaced_job(n, ns, propagation_policy="Background")),
            (self.core.list_namespaced_service, lambda n: self.core.delete_namespaced_service(n, ns)),
            (self.core.list_namespaced_config_map, lambda n: self.core.delete_namespaced_config_map(n, ns)),
            (self.rbac.list_namespaced_role_binding, lambda n: self.rbac.delete_namespaced_role_binding(n, ns)),
            (self.rbac.list_namespaced_role, lambda n: self.rbac.delete_namespaced_role(n, ns)),
            (self.core.list_namespaced_service_account, lambda n: self.core.delete_namespaced_service_account(n, ns)),
        ):
            self.on_request("list")
            for item in lister(ns, label_selector=selector).items:
                self.on_request("delete")
                try:
                    deleter(item.metadata.name)
                except ApiException as error:
                    if error.status != 404:
                        raise

    def patch_status(self, obj: dict, status: dict) -> None:
        meta = obj["metadata"]
        self.on_request("patch")
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, meta["namespace"], PLURALS[obj["kind"]], meta["name"], {"status": status})

    def event(self, obj: dict, type_: str, reason: str, message: str, now: datetime) -> None:
        meta = obj["metadata"]
        self.on_request("create")
        body = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta["uid"]},
            "type": type_, "reason": reason[:128], "message": message[:1024],
            "source": {"component": "dhad-operator"},
            "firstTimestamp": rfc3339(now), "lastTimestamp": rfc3339(now), "count": 1,
        }
        try:
            self.core.create_namespaced_event(meta["namespace"], body)
        except ApiException as error:  # events are for people; never fail a reconcile on them
            log.warning("event not recorded: %s", error.reason)

    def execute(self, obj: dict, plan: Plan, now: datetime) -> None:
        """Order matters: status first (attempt numbers survive a crash), then deletes, then creates."""
        ns = obj["metadata"]["namespace"]
        if plan.status != (obj.get("status") or {}):
            self.patch_status(obj, plan.status)
        for name in plan.delete_jobs:
            self.delete_job(ns, name)
        if plan.delete_children:
            self.delete_children(obj)
        for manifest in plan.create:
            self.create(manifest)
        for type_, reason, message in plan.events:
            self.event(obj, type_, reason, message, now)
