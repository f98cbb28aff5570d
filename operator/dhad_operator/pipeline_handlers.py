"""Thin kopf handlers for pipelines: an event about a pipeline, or about a Dhad job labelled with a
pipeline's name (its child: state, outputs, scores), runs that pipeline's reconcile.

Imported by __main__ next to handlers.py; the reconcile itself is pipeline_k8s.reconcile_pipeline, which
the Controller calls for kind Pipeline (one at a time per pipeline, requeued as the plan asks).
"""

from __future__ import annotations

import kopf

from dhad_api.jobs import GROUP, KINDS, VERSION
from dhad_api.pipeline import KIND, LABEL_PIPELINE, PLURAL
from dhad_operator import handlers


def _pipeline_event(event, body, **_):
    if event["type"] != "DELETED":
        handlers._controller.enqueue(KIND, body["metadata"]["namespace"], body["metadata"]["name"])


def _child_job_event(body, **_):
    pipeline = (body["metadata"].get("labels") or {}).get(LABEL_PIPELINE)
    if pipeline:
        handlers._controller.enqueue(KIND, body["metadata"]["namespace"], pipeline)


kopf.on.event(GROUP, VERSION, PLURAL)(_pipeline_event)
for _info in KINDS.values():
    kopf.on.event(GROUP, VERSION, _info.plural, labels={LABEL_PIPELINE: kopf.PRESENT})(_child_job_event)
