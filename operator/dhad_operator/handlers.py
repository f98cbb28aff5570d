"""Thin kopf handlers: every event about a job, or about one of its children, runs its reconcile.

No kopf state is stored on the objects (only event handlers, no create/update handlers, no timers),
so the operator adds no finalizers and never blocks deletion while it is down.
"""

from __future__ import annotations

import kopf

from dhad_api.jobs import GROUP, KINDS, VERSION
from dhad_operator import metrics
from dhad_operator.controller import Controller
from dhad_operator.health import HEALTH
from dhad_operator.render import LABEL_JOB, LABEL_KIND

_controller: Controller | None = None


def install(controller: Controller) -> None:
    global _controller
    _controller = controller


def _job_event(event, body, **_):
    meta = body["metadata"]
    if event["type"] == "DELETED":
        metrics.JOB_STATES.set(body["kind"], meta["namespace"], meta["name"], None)
        return
    _controller.enqueue(body["kind"], meta["namespace"], meta["name"])


def _child_event(body, **_):
    labels = body["metadata"].get("labels") or {}
    if labels.get(LABEL_KIND) in {i.kind.value for i in KINDS.values()}:
        _controller.enqueue(labels[LABEL_KIND], body["metadata"]["namespace"], labels[LABEL_JOB])


for _info in KINDS.values():
    kopf.on.event(GROUP, VERSION, _info.plural)(_job_event)

for _group, _version, _plural in (("batch", "v1", "jobs"), ("", "v1", "pods"), ("", "v1", "configmaps")):
    kopf.on.event(_group, _version, _plural, labels={LABEL_JOB: kopf.PRESENT, LABEL_KIND: kopf.PRESENT})(_child_event)


@kopf.on.startup()
def _configure(settings: kopf.OperatorSettings, **_):
    HEALTH.ready = True
    settings.posting.enabled = False  # the reconcile posts its own events, for people
    settings.execution.max_workers = 16
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
