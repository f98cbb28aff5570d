"""Leader election with a coordination.k8s.io Lease, taken before kopf starts.

kopf's own peering freezes replicas of equal priority; here standbys simply wait for the Lease, and
a leader that cannot renew it exits (its pod restarts as a standby), so two never reconcile at once.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from kubernetes import client
from kubernetes.client.rest import ApiException

from dhad_operator.status import now_utc

log = logging.getLogger("dhad.leader")


class LeaseLock:
    def __init__(self, api: client.ApiClient, name: str, namespace: str, identity: str, duration: int = 15):
        self.coordination = client.CoordinationV1Api(api)
        self.name, self.namespace, self.identity, self.duration = name, namespace, identity, duration

    def _body(self, transitions: int) -> dict:
        now = now_utc().isoformat()
        return {"metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": self.duration,
                         "acquireTime": now, "renewTime": now, "leaseTransitions": transitions}}

    def try_acquire(self) -> bool:
        try:
            lease = self.coordination.read_namespaced_lease(self.name, self.namespace)
        except ApiException as error:
            if error.status != 404:
                raise
            try:
                self.coordination.create_namespaced_lease(self.namespace, self._body(0))
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
            body["spec"]["acquireTime"] = spec.acquire_time.isoformat()
        body["metadata"]["resourceVersion"] = lease.metadata.resource_version
        try:
            self.coordination.replace_namespaced_lease(self.name, self.namespace, body)
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
