"""The election's timing rules on a fake clock and an in-memory Lease with resourceVersion checks
(the real-apiserver behaviour is in tests/integration/test_operator_operations.py)."""

from __future__ import annotations

import copy

from dhad_operator.k8s import ApiError
from dhad_operator.leader import LeaderElector, timings


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class LeaseServer:
    """read_lease/write_lease as the apiserver answers them: a PUT with a stale version is a 409."""

    def __init__(self):
        self.lease = None
        self.version = 0
        self.reachable = True

    def read_lease(self, namespace, name):
        self._check()
        return copy.deepcopy(self.lease)

    def write_lease(self, namespace, body, create):
        self._check()
        if create and self.lease is not None:
            raise ApiError(409, "AlreadyExists", "")
        if not create and body["metadata"].get("resourceVersion") != self.lease["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", "")
        self.version += 1
        self.lease = copy.deepcopy(body)
        self.lease["metadata"]["resourceVersion"] = str(self.version)
        return copy.deepcopy(self.lease)

    def _check(self):
        if not self.reachable:
            raise ApiError(0, "Unreachable", "timed out")


def elector(server, clock, identity):
    return LeaderElector(server, "lease", "ns", identity, duration=15, clock=clock)


def test_the_timeouts_end_every_write_before_a_standby_may_lead():
    for duration in (6, 10, 15, 60):
        deadline, retry, timeout = timings(duration)
        assert deadline + timeout < duration and retry < deadline


def test_a_candidate_trusts_its_own_clock_not_the_holders():
    server, clock = LeaseServer(), Clock()
    holder = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "lease", "namespace": "ns"},
              "spec": {"holderIdentity": "ghost", "leaseDurationSeconds": 15, "renewTime": "2000-01-01T00:00:00.000000Z"}}
    server.write_lease("ns", holder, create=True)
    candidate = elector(server, clock, "me")
    for step in range(10):  # the holder renews every 3 s with a clock stuck in the year 2000
        candidate.step()
        assert not candidate.leading
        clock.now += 3
        current = server.read_lease("ns", "lease")
        current["spec"]["renewTime"] = f"2000-01-01T00:00:{step:02d}.000000Z"
        server.write_lease("ns", current, create=False)
    candidate.step()  # sees the last renewal change
    clock.now += 14
    candidate.step()
    assert not candidate.leading  # 14 s of silence is less than the lease
    clock.now += 2
    candidate.step()
    assert candidate.leading and server.lease["spec"]["holderIdentity"] == "me" and server.lease["spec"]["leaseTransitions"] == 1


def test_a_leader_that_cannot_renew_shuts_its_gate_by_its_deadline_even_without_its_loop():
    server, clock = LeaseServer(), Clock()
    leader = elector(server, clock, "me")
    leader.step()
    assert leader.leading and leader.may_write()
    server.reachable = False
    clock.now += leader.renew_deadline - 0.1
    assert leader.may_write()
    clock.now += 0.2  # the renewal loop may be stuck: the gate looks at the clock itself
    assert not leader.may_write()
    leader.step()
    assert not leader.leading and leader.wedged() == []  # not yet: it may reach the Lease again
    clock.now += leader.duration
    leader.step()
    assert any("could not renew" in p for p in leader.wedged())  # /healthz fails: a restart may help
    server.reachable = True
    leader.step()
    assert leader.wedged() == [] and leader.leading  # the Lease was still its own


def test_a_standby_takes_over_only_a_full_lease_after_the_last_renewal_it_saw():
    server, clock = LeaseServer(), Clock()
    leader, standby = elector(server, clock, "a"), elector(server, clock, "b")
    leader.step()
    standby.step()
    assert leader.leading and not standby.leading
    clock.now += 2.5
    leader.step()  # a renewal: one PUT on its own last write, no read
    standby.step()
    last_renewal = clock.now  # from here the leader is cut off and makes no call
    gate_shut = None
    while not standby.leading:
        clock.now += 0.5
        if gate_shut is None and not leader.may_write():
            gate_shut = clock.now
        standby.step()
    assert clock.now - last_renewal >= 15
    assert gate_shut is not None and gate_shut <= last_renewal + leader.renew_deadline + 0.5
    assert gate_shut + timings(15)[2] < clock.now  # even a write started just before the gate shut has ended


def test_a_takeover_loses_to_a_renewal_in_between():
    server, clock = LeaseServer(), Clock()
    leader, standby = elector(server, clock, "a"), elector(server, clock, "b")
    leader.step()
    standby.step()
    clock.now += 20
    read = standby.kube.read_lease
    standby.kube = type("Racing", (), {"read_lease": lambda self, ns, n: (read(ns, n), leader.step())[0],
                                       "write_lease": lambda self, ns, body, create: server.write_lease(ns, body, create)})()
    standby.step()  # it read the old record, then the leader renewed before its PUT: 409
    assert not standby.leading and server.lease["spec"]["holderIdentity"] == "a"


def test_release_hands_the_lease_back_at_once(monkeypatch):
    import dhad_operator.leader as leader_module

    monkeypatch.setattr(leader_module.time, "sleep", lambda s: None)
    server, clock = LeaseServer(), Clock()
    leader, standby = elector(server, clock, "a"), elector(server, clock, "b")
    leader.step()
    standby.step()
    leader.release()
    assert not leader.may_write() and server.lease["spec"]["holderIdentity"] is None
    standby.step()
    assert standby.leading
