"""Leader election with a coordination.k8s.io Lease, taken before kopf starts.

kopf's own peering freezes replicas of equal priority; here standbys simply wait for the Lease, and
a leader that cannot renew it exits (its pod restarts as a standby), so two never reconcile at once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import UTC

from kubernetes import client
from kubernetes.client.rest import ApiException

from dhad_operator.status import now_utc

log = logging.getLogger("dhad.leader")


def micro_time(moment) -> str:
    """metav1.MicroTime's wire format (the apiserver rejects +00:00 offsets here)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseLock:
    def __init__(self, api: client.ApiClient, name: str, namespace: str, identity: str, duration: int = 15):
        self.coordination = client.CoordinationV1Api(api)
        self.name, self.namespace, self.identity, self.duration = name, namespace, identity, duration

    def _body(self, transitions: int) -> dict:
        now = micro_time(now_utc())
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": self.duration,
                         "acquireTime": now, "renewTime": now, "leaseTransitions": transitions}}

    def _write(self, method: str, path: str, body: dict) -> None:
        """Raw create/replace: the typed client re-serialises MicroTime with a +00:00 offset, which the
        apiserver rejects, so the body goes out exactly as built here."""
        api = self.coordination.api_client
        method, url, headers, data, _ = api.param_serialize(
            method, path, header_params={"Content-Type": "application/json", "Accept": "application/json"},
            body=body, auth_settings=["BearerToken"])
        response = api.call_api(method, url, header_params=headers, body=data)
        response.read()
        if response.status >= 400:
            raise ApiException(status=response.status, reason=response.reason)

    def try_acquire(self) -> bool:
        try:
            lease = self.coordination.read_namespaced_lease(self.name, self.namespace)
        except ApiException as error:
            if error.status != 404:
                raise
            try:
                self._write("POST", f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases", self._body(0))
                return True
            except ApiException as create_error:
                if create_error.status == 409:
                    return False
                raise
        spec = lease.spec
        expired = spec.renew_time is None or (now_utc() - spec.renew_time).total_seconds() > (spec.lease_duration_seconds or self.duration)
        if spec.holder_identity != self.identity and not expired:
            return False
        body = self._body((spec.lease_transitions or 0) + (spec.holder_identity != self.identity))
        if spec.holder_identity == self.identity and spec.acquire_time:
            body["spec"]["acquireTime"] = micro_time(spec.acquire_time)
        body["metadata"]["resourceVersion"] = lease.metadata.resource_version
        body["apiVersion"], body["kind"] = "coordination.k8s.io/v1", "Lease"
        try:
            self._write("PUT", f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases/{self.name}", body)
            return True
        except ApiException as error:
            if error.status == 409:
                return False
            raise

    def acquire(self) -> None:
        log.info("waiting for lease %s/%s as %s", self.namespace, self.name, self.identity)
        while not self.try_acquire():
            time.sleep(self.duration / 3)
        log.info("leading as %s", self.identity)
        threading.Thread(target=self._renew, name="dhad-lease", daemon=True).start()

    def _renew(self) -> None:
        last = time.monotonic()
        while True:
            time.sleep(self.duration / 3)
            try:
                if self.try_acquire():
                    last = time.monotonic()
                    continue
            except Exception as error:  # noqa: BLE001 - any failure counts against the deadline
                log.warning("lease renewal failed: %s", error)
            if time.monotonic() - last > self.duration * 2 / 3:
                log.error("lost the lease; exiting so a standby takes over")
                os._exit(1)
