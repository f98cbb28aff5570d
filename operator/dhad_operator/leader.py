"""Leader election on a coordination.k8s.io Lease that cannot let two replicas write at once.

Every replica runs its caches; only the Lease holder's workers reconcile, and every write passes a
gate (`may_write`). The rules, client-go's:
- A candidate judges expiry by its own monotonic clock: the Lease is free when its record (holder,
  renewTime, transitions, resourceVersion) has not changed for leaseDurationSeconds since this
  candidate last saw it change. The holder's clock (renewTime) is never compared with ours.
- The leader's gate shuts `renew_deadline` (half the lease) after the start of its last successful
  renewal, whether or not the renewal loop is still running; every API call times out after at most
  `request_timeout` (the rest of the lease, less a margin), so the last write the leader started ends
  before a standby, which waits a full lease after the same renewal, can take over.
- A takeover is a PUT with the observed resourceVersion, so a renewal in between wins.
- On shutdown the leader shuts its gate, then releases the Lease (empty holder) so a standby takes
  over at its next try instead of after a full lease.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from datetime import UTC, datetime

from dhad_operator import metrics
from dhad_operator.k8s import ApiError, Kube

log = logging.getLogger("dhad.leader")


def micro_time(moment: datetime) -> str:
    """metav1.MicroTime's wire format (the apiserver rejects +00:00 offsets here)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def timings(duration: float) -> tuple[float, float, float]:
    """(renew deadline, retry period, request timeout) for a lease of `duration` seconds."""
    renew_deadline = duration / 2
    return renew_deadline, duration / 6, (duration - renew_deadline) * 0.8


class LeaderElector:
    def __init__(self, kube: Kube, name: str, namespace: str, identity: str, duration: float = 15,
                 clock=time.monotonic, on_started=lambda: None, on_stopped=lambda: None):
        self.kube, self.name, self.namespace, self.identity, self.duration = kube, name, namespace, identity, duration
        self.renew_deadline, self.retry_period, _ = timings(duration)
        self.clock, self.on_started, self.on_stopped = clock, on_started, on_stopped
        self._record = None  # the Lease record last seen, and when (our clock) it last changed
        self._changed_at = 0.0
        self._renewed_at: float | None = None  # start of our last successful acquire/renew
        self._lease: dict | None = None  # our last written Lease, for a renewal without a read
        self.leading = False
        self.heartbeat = clock()
        self._last_ok = clock()  # the last Lease call that succeeded
        self._lost_renewal = False  # stopped leading because it could not renew
        self._stopped = threading.Event()

    def may_write(self) -> bool:
        return self.leading and self._renewed_at is not None and self.clock() < self._renewed_at + self.renew_deadline

    def wedged(self) -> list[str]:
        """For /healthz: the lease loop stopped, or this replica lost the lease because it could not
        renew and has not reached the Lease since (a restart may help; controller-runtime exits)."""
        if self.clock() - self.heartbeat > 2 * self.duration + 10:
            return ["the lease loop stopped"]
        if self._lost_renewal and self.clock() - self._last_ok > self.duration:
            return [f"could not renew the lease, and no Lease call has succeeded for {self.clock() - self._last_ok:.0f} s"]
        return []

    def start(self) -> None:
        threading.Thread(target=self._run, name="dhad-lease", daemon=True).start()

    def _run(self) -> None:
        log.info("candidate for lease %s/%s as %s", self.namespace, self.name, self.identity)
        while not self._stopped.is_set():
            self.heartbeat = self.clock()
            self.step()
            self._stopped.wait(self.retry_period * (1 if self.leading else random.uniform(1.0, 1.2)))

    def step(self) -> None:
        """One try to acquire or renew, then the gate's and the callbacks' consequences."""
        try:
            held = self.try_acquire_or_renew()
            self._last_ok, self._lost_renewal = self.clock(), False
        except (ApiError, OSError) as error:
            log.warning("lease %s/%s: %s", self.namespace, self.name, error)
            held = False
        if held and not self.leading:
            self.leading = True
            metrics.LEADER.set(1)
            log.info("leading as %s", self.identity)
            self.on_started()
        elif self.leading and not self.may_write():
            self._stop_leading(f"could not renew the lease within {self.renew_deadline:.1f} s")
            self._lost_renewal = True

    def _stop_leading(self, why: str) -> None:
        self.leading = False
        self._lease = None
        metrics.LEADER.set(0)
        log.error("stopped leading: %s; standing by", why)
        self.on_stopped()

    def _observe(self, lease: dict) -> None:
        spec = lease.get("spec") or {}
        record = (spec.get("holderIdentity"), spec.get("renewTime"), spec.get("leaseTransitions"),
                  lease["metadata"].get("resourceVersion"))
        if record != self._record:
            self._record, self._changed_at = record, self.clock()

    def try_acquire_or_renew(self) -> bool:
        started = self.clock()
        now = micro_time(datetime.now(UTC))
        if self.leading and self._lease is not None:  # renew from our own last write: one request
            body = {**self._lease, "spec": {**self._lease["spec"], "renewTime": now}}
            try:
                return self._written(self.kube.write_lease(self.namespace, body, create=False), started)
            except ApiError as error:
                if error.code != 409:
                    raise
                self._lease = None  # someone else wrote it: read and judge
        lease = self.kube.read_lease(self.namespace, self.name)
        if lease is None:
            body = self._body(now, now, 0, None)
            try:
                return self._written(self.kube.write_lease(self.namespace, body, create=True), started)
            except ApiError as error:
                if error.code == 409:
                    return False
                raise
        self._observe(lease)
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity")
        if holder and holder != self.identity:
            if self.leading:
                self._stop_leading(f"the lease is held by {holder}")
            expires = self._changed_at + float(spec.get("leaseDurationSeconds") or self.duration)
            if self.clock() < expires:
                return False
        acquired = spec.get("acquireTime") if holder == self.identity and spec.get("acquireTime") else now
        transitions = int(spec.get("leaseTransitions") or 0) + (holder != self.identity)
        body = self._body(acquired, now, transitions, lease["metadata"]["resourceVersion"])
        try:
            return self._written(self.kube.write_lease(self.namespace, body, create=False), started)
        except ApiError as error:
            if error.code == 409:
                return False
            raise

    def _written(self, lease: dict, started: float) -> bool:
        self._lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                       "metadata": {"name": self.name, "namespace": self.namespace, "resourceVersion": lease["metadata"]["resourceVersion"]},
                       "spec": dict(lease["spec"])}
        self._renewed_at = started
        self._observe(lease)
        return True

    def _body(self, acquired: str, renewed: str, transitions: int, version: str | None) -> dict:
        metadata = {"name": self.name, "namespace": self.namespace, **({"resourceVersion": version} if version else {})}
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata,
                "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": int(self.duration),
                         "acquireTime": acquired, "renewTime": renewed, "leaseTransitions": transitions}}

    def release(self) -> None:
        """Shut the gate, let the writes in flight end, then hand the Lease back (empty holder) so a
        standby takes over at its next try instead of after a full lease."""
        self._stopped.set()
        if not self.leading or self._lease is None:
            return
        self.leading = False
        metrics.LEADER.set(0)
        time.sleep(timings(self.duration)[2])
        body = {**self._lease, "spec": {**self._lease["spec"], "holderIdentity": None, "leaseDurationSeconds": 1,
                                        "renewTime": micro_time(datetime.now(UTC))}}
        try:
            self.kube.write_lease(self.namespace, body, create=False)
            log.info("released lease %s/%s", self.namespace, self.name)
        except (ApiError, OSError) as error:
            log.warning("could not release the lease: %s", error)
