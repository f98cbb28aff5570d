"""Kueue's conventions for a Dhad job: the `kueue.x-k8s.io/queue-name` label on the job object names the
LocalQueue (as for every workload kind Kueue knows), and `kueue.x-k8s.io/priority-class` names a
WorkloadPriorityClass. The operator copies both onto each sub-stage's batch Job, which it creates
suspended for Kueue to admit. `spec.queueName` is an alias kept for manifests written before: it is
used only when the label is absent.
"""

from __future__ import annotations

QUEUE_NAME_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_CLASS_LABEL = "kueue.x-k8s.io/priority-class"


def kueue_labels(job_labels: dict | None, queue_name_alias: str | None = None) -> dict[str, str]:
    """The Kueue labels a job's batch Jobs carry: the job's own, else spec.queueName for the queue."""
    labels = job_labels or {}
    out: dict[str, str] = {}
    queue = labels.get(QUEUE_NAME_LABEL) or queue_name_alias
    if queue:
        out[QUEUE_NAME_LABEL] = queue
    if labels.get(PRIORITY_CLASS_LABEL):
        out[PRIORITY_CLASS_LABEL] = labels[PRIORITY_CLASS_LABEL]
    return out
