"""The work queue keeps client-go's promises: one worker per key, dirty keys run once more, new keys
first, per-key exponential backoff with a cap, delayed adds at their moment."""

from __future__ import annotations

import threading
import time

from dhad_operator.controller import WorkQueue


def test_a_key_in_flight_is_not_handed_out_again_and_runs_once_more_after():
    queue = WorkQueue()
    queue.add("a")
    assert queue.get(0.1) == "a"
    for _ in range(5):  # a burst of events while it is reconciled
        queue.add("a")
    assert queue.get(0.05) is None  # never two workers on one key
    queue.done("a")
    assert queue.get(0.1) == "a"  # the burst became exactly one more reconcile
    queue.done("a")
    assert queue.get(0.05) is None


def test_a_queued_key_is_not_queued_twice():
    queue = WorkQueue()
    for _ in range(3):
        queue.add("a")
    queue.add("b")
    assert len(queue) == 2 and [queue.get(0.1), queue.get(0.1)] == ["a", "b"]


def test_keys_never_reconciled_go_first():
    queue = WorkQueue()
    queue.add("old")
    assert queue.get(0.1) == "old"
    queue.done("old")
    queue.add("old")  # a follow-up of a key already reconciled
    queue.add("new-1")
    queue.add("new-2")
    assert [queue.get(0.1) for _ in range(3)] == ["new-1", "new-2", "old"]


def test_errors_back_off_exponentially_per_key_with_a_cap():
    queue = WorkQueue(base_delay=1, max_delay=8)
    assert [queue.add_rate_limited("a") for _ in range(6)] == [1, 2, 4, 8, 8, 8]
    assert queue.add_rate_limited("b") == 1  # per key
    queue.forget("a")
    assert queue.add_rate_limited("a") == 1


def test_a_delayed_add_arrives_at_its_moment_and_the_earliest_wins():
    queue = WorkQueue()
    started = time.monotonic()
    queue.add_after("a", 5.0)
    queue.add_after("a", 0.3)  # an earlier timer replaces a later one
    assert queue.get(2.0) == "a"
    assert 0.25 <= time.monotonic() - started < 1.5
    queue.done("a")
    assert queue.get(0.5) is None  # the superseded 5 s timer does not fire a second time soon


def test_many_workers_never_share_a_key():
    queue = WorkQueue()
    active, overlaps, runs = set(), [], []
    lock = threading.Lock()

    def worker():
        while (key := queue.get(0.3)) is not None:
            with lock:
                if key in active:
                    overlaps.append(key)
                active.add(key)
            time.sleep(0.001)
            with lock:
                active.discard(key)
                runs.append(key)
            queue.done(key)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for i in range(2000):
        queue.add(f"k{i % 10}")
    for t in threads:
        t.join()
    assert overlaps == [] and set(runs) == {f"k{i}" for i in range(10)}
    assert len(runs) < 2000  # events for a queued or running key coalesced
