"""Kueue's conventions: the kueue.x-k8s.io/queue-name label on the job object queues every sub-stage's
Job (spec.queueName is an alias the label overrides), and kueue.x-k8s.io/priority-class passes through."""

from __future__ import annotations

from dhad_api.queueing import PRIORITY_CLASS_LABEL, QUEUE_NAME_LABEL, kueue_labels
from tests.unit.test_reconcile import condition, decide_at, job_obj


def labelled(labels: dict, **spec) -> dict:
    obj = job_obj(**spec)
    obj["metadata"]["labels"] = labels
    return obj


def test_the_job_label_queues_every_attempt_and_names_the_queue():
    plan = decide_at(labelled({QUEUE_NAME_LABEL: "team-a", PRIORITY_CLASS_LABEL: "research-high"}))
    job = plan.create[-1]
    assert job["kind"] == "Job" and job["spec"]["suspend"] is True
    assert job["metadata"]["labels"][QUEUE_NAME_LABEL] == "team-a"
    assert job["metadata"]["labels"][PRIORITY_CLASS_LABEL] == "research-high"
    assert plan.status["state"] == "Queued" and "team-a" in condition(plan.status, "Queued")["message"]


def test_the_label_wins_over_the_spec_alias_which_still_works_alone():
    both = decide_at(labelled({QUEUE_NAME_LABEL: "team-a"}, queueName="old-queue")).create[-1]
    assert both["metadata"]["labels"][QUEUE_NAME_LABEL] == "team-a"
    alias = decide_at(job_obj(queueName="old-queue")).create[-1]
    assert alias["metadata"]["labels"][QUEUE_NAME_LABEL] == "old-queue" and alias["spec"]["suspend"] is True


def test_a_priority_class_alone_does_not_queue_and_other_labels_stay_out():
    job = decide_at(labelled({PRIORITY_CLASS_LABEL: "research-high", "team": "nlp"})).create[-1]
    assert job["spec"]["suspend"] is False and QUEUE_NAME_LABEL not in job["metadata"]["labels"]
    assert job["metadata"]["labels"][PRIORITY_CLASS_LABEL] == "research-high" and "team" not in job["metadata"]["labels"]
    assert kueue_labels(None) == {} and kueue_labels({}, "q") == {QUEUE_NAME_LABEL: "q"}


def test_tracking_and_hub_credentials_reach_the_pods_only_by_secret_reference():
    from dhad_api.common import RESERVED_ENV

    obj = job_obj(tracking={"mlflow": {"trackingUri": "https://mlflow.ml:5000", "tokenSecretRef": {"name": "mlflow", "key": "t"}},
                            "wandb": {"project": "acegpt", "apiKeySecretRef": {"name": "wandb", "key": "api-key"}}},
                  output={"hub": {"repoId": "org/m", "tokenSecretRef": {"name": "hf-write", "key": "token"}}})
    plan = decide_at(obj)
    env = {e["name"]: e for e in plan.create[-1]["spec"]["template"]["spec"]["containers"][0]["env"]}
    expected = {"WANDB_API_KEY": ("wandb", "api-key"), "MLFLOW_TRACKING_TOKEN": ("mlflow", "t"), "DHAD_HUB_TOKEN": ("hf-write", "token")}
    for name, (secret, key) in expected.items():
        assert env[name] == {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
        assert name in RESERVED_ENV
    assert not any("value" in env[n] for n in expected)  # never an inline value
