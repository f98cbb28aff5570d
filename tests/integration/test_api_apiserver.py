"""The generated CRDs on the real apiserver: every example is accepted with strict field validation,
stored exactly as the models default it, and each bad manifest in the table is rejected at apply
time with a message naming the field. The Python models reject the same specs (local mode has no
apiserver), except where only the apiserver can see it (metadata.name, updates)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from dhad_api.base import RuledModel
from dhad_api.jobs import KINDS, parse_spec
from dhad_api.pipeline import PLURAL as PIPELINES
from dhad_api.pipeline import parse_pipeline

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[2]
DELETE = object()


def example(name: str) -> dict:
    return yaml.safe_load((REPO / "examples" / "tiny" / f"{name}.yaml").read_text())


def mutate(doc: dict, changes: dict) -> dict:
    """Applies {"a.b.c": value} (DELETE removes) to a copy of the manifest."""
    doc = copy.deepcopy(doc)
    for path, value in changes.items():
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        if value is DELETE:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return doc


def create(kube, namespace: str, doc: dict) -> dict:
    plural = PIPELINES if doc["kind"] == "Pipeline" else next(i.plural for i in KINDS.values() if i.kind.value == doc["kind"])
    doc = copy.deepcopy(doc)
    doc["metadata"]["namespace"] = namespace
    return client.CustomObjectsApi(kube).create_namespaced_custom_object(
        "dhad.dev", "v1alpha1", namespace, plural, doc, field_validation="Strict"
    )


def parse(doc: dict):
    """The Python models' verdict on a manifest's spec (what local mode and the operator use)."""
    return parse_pipeline(doc["spec"]) if doc["kind"] == "Pipeline" else parse_spec(doc["kind"], doc["spec"])


SECRET_REF = {"name": "s3", "accessKeyIdKey": "id", "secretAccessKeyKey": "key"}
# (case id, example, changes, fragment the apiserver's message must contain)
BAD = [
    ("nodes-zero", "sft", {"spec.resources.nodes": 0}, "spec.resources.nodes"),
    ("nodes-negative", "sft", {"spec.resources.nodes": -2}, "spec.resources.nodes"),
    ("nodes-too-many", "sft", {"spec.resources.nodes": 513}, "spec.resources.nodes"),
    ("gpus-too-many", "sft", {"spec.resources.gpusPerNode": 17}, "spec.resources.gpusPerNode"),
    ("cpu-not-quantity", "sft", {"spec.resources.cpu": "lots"}, "spec.resources.cpu"),
    ("unknown-strategy", "sft", {"spec.distributed": {"strategy": "horovod"}}, "spec.distributed.strategy"),
    ("zero-stage-4", "sft", {"spec.distributed": {"strategy": "deepspeed", "zeroStage": 4}}, "spec.distributed.zeroStage"),
    ("zero-stage-with-ddp", "sft", {"spec.distributed": {"zeroStage": 2}}, "zeroStage needs strategy deepspeed"),
    ("offload-with-ddp", "sft", {"spec.distributed": {"offload": "optimizer"}}, "offload needs strategy deepspeed"),
    ("param-offload-zero2", "sft", {"spec.distributed": {"strategy": "deepspeed", "zeroStage": 2, "offload": "optimizer-and-parameters"}}, "needs zeroStage 3"),
    ("fsdp-settings-with-ddp", "sft", {"spec.distributed": {"fsdp": {"sharding": "hybrid"}}}, "distributed.fsdp needs strategy fsdp"),
    ("fsdp-sharding-unknown", "sft", {"spec.distributed": {"strategy": "fsdp", "fsdp": {"sharding": "zero"}}}, "spec.distributed.fsdp.sharding"),
    ("plan-gpu-memory-not-a-quantity", "sft", {"spec.plan": {"gpuMemory": "eighty"}}, "spec.plan.gpuMemory"),
    ("hf-token-without-key", "sft", {"spec.hfTokenSecretRef": {"name": "hf"}}, "spec.hfTokenSecretRef.key"),
    ("hf-token-as-env-value", "sft", {"spec.env": [{"name": "HF_TOKEN", "value": "hf_x"}]}, "reserved"),
    ("precision-unknown", "sft", {"spec.training.precision": "bf8"}, "spec.training.precision"),
    ("attention-unknown", "sft", {"spec.model.attention": "flash3"}, "spec.model.attention"),
    ("learning-rate-zero", "sft", {"spec.training.learningRate": 0}, "spec.training.learningRate"),
    ("learning-rate-negative", "sft", {"spec.training.learningRate": -0.1}, "spec.training.learningRate"),
    ("precision-fp8", "sft", {"spec.training.precision": "fp8"}, "spec.training.precision"),
    ("steps-and-epochs", "sft", {"spec.training.epochs": 2}, "at most one of maxSteps and epochs"),
    ("sequence-too-short", "sft", {"spec.training.sequenceLength": 8}, "spec.training.sequenceLength"),
    ("lora-rank-zero", "sft", {"spec.training.lora": {"r": 0}}, "spec.training.lora.r"),
    ("custom-template-missing", "sft", {"spec.training.chatTemplate": {"source": "custom"}}, "template is set exactly when source is custom"),
    ("template-without-custom", "sft", {"spec.training.chatTemplate": {"source": "chatml", "template": "{{x}}"}}, "template is set exactly when source is custom"),
    ("no-data", "sft", {"spec.data": []}, "list at least one dataset, or set respond"),
    ("unknown-schema", "sft", {"spec.data.0.schema": "sharegpt"}, "spec.data[0].schema"),
    ("weight-zero", "sft", {"spec.data.0.weight": 0}, "spec.data[0].weight"),
    ("model-uri-bad-scheme", "sft", {"spec.model": {"uri": "ftp://models/x"}}, "spec.model.uri"),
    ("model-uri-uppercase-bucket", "sft", {"spec.model": {"uri": "s3://MyBucket/x"}}, "spec.model.uri"),
    ("model-uri-inline-credentials", "sft", {"spec.model": {"uri": "s3://AKIA:secret@bucket/x"}}, "spec.model.uri"),
    ("model-both-sources", "sft", {"spec.model.uri": "s3://bucket/m"}, "set exactly one of uri and fromJob"),
    ("model-no-source", "sft", {"spec.model": {"dtype": "auto"}}, "set exactly one of uri and fromJob"),
    ("from-eval-job", "sft", {"spec.model.fromJob.kind": "EvalJob"}, "an EvalJob has no output model"),
    ("dtype-int4", "sft", {"spec.model.dtype": "int4"}, "spec.model.dtype"),
    ("resume-from-not-s3", "sft", {"spec.checkpoint.resumeFrom": "http://x/ckpt"}, "spec.checkpoint.resumeFrom"),
    ("resume-from-malformed", "sft", {"spec.checkpoint.resumeFrom": "s3:/bucket/ckpt"}, "spec.checkpoint.resumeFrom"),
    ("keep-last-zero", "sft", {"spec.checkpoint.keepLast": 0}, "spec.checkpoint.keepLast"),
    ("interval-zero", "sft", {"spec.checkpoint.intervalSteps": 0}, "spec.checkpoint.intervalSteps"),
    ("inline-access-key", "sft", {"spec.storage.accessKey": "AKIA123"}, 'unknown field "spec.storage.accessKey"'),
    ("inline-secret-in-ref", "sft", {"spec.storage.secretRef": {**SECRET_REF, "secretAccessKey": "x"}}, 'unknown field "spec.storage.secretRef.secretAccessKey"'),
    ("endpoint-with-userinfo", "sft", {"spec.storage.endpoint": "http://user:pass@minio:9000"}, "spec.storage.endpoint"),
    ("endpoint-no-scheme", "sft", {"spec.storage.endpoint": "minio:9000"}, "spec.storage.endpoint"),
    ("bucket-invalid", "sft", {"spec.storage.bucket": "My_Bucket"}, "spec.storage.bucket"),
    ("storage-missing", "sft", {"spec.storage": DELETE}, "spec.storage"),
    ("unknown-spec-field", "sft", {"spec.gpus": 8}, 'unknown field "spec.gpus"'),
    ("env-reserved", "sft", {"spec.env": [{"name": "MASTER_ADDR", "value": "x"}]}, "this name is reserved"),
    ("env-reserved-prefix", "sft", {"spec.env": [{"name": "DHAD_PROGRESS_CONFIGMAP", "value": "other"}]}, "this name is reserved"),
    ("env-inline-token", "sft", {"spec.env": [{"name": "COMET_API_KEY", "value": "comet-abc"}]}, "credential-like name must use valueFrom"),
    ("env-value-and-from", "sft", {"spec.env": [{"name": "A", "value": "1", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}, "exactly one of value and valueFrom"),
    ("env-duplicate", "sft", {"spec.env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}, "names must be unique"),
    ("queue-name-invalid", "sft", {"spec.queueName": "Bad Queue"}, "spec.queueName"),
    ("ttl-negative", "sft", {"spec.ttlSecondsAfterFinished": -1}, "spec.ttlSecondsAfterFinished"),
    ("deadline-zero", "sft", {"spec.activeDeadlineSeconds": 0}, "spec.activeDeadlineSeconds"),
    ("max-restarts-too-many", "sft", {"spec.restartPolicy": {"maxRestarts": 101}}, "spec.restartPolicy.maxRestarts"),
    ("toleration-operator", "sft", {"spec.podTemplate": {"tolerations": [{"operator": "Maybe"}]}}, "spec.podTemplate.tolerations[0].operator"),
    # production pod fields (issue 15.5)
    ("pull-secret-bad-name", "sft", {"spec.podTemplate": {"imagePullSecrets": [{"name": "Registry_Creds"}]}}, "spec.podTemplate.imagePullSecrets[0].name"),
    ("pull-secret-inline", "sft", {"spec.podTemplate": {"imagePullSecrets": [{"name": "r", "dockerconfigjson": "e30="}]}},
     'unknown field "spec.podTemplate.imagePullSecrets[0].dockerconfigjson"'),
    ("pull-secret-twice", "sft", {"spec.podTemplate": {"imagePullSecrets": [{"name": "r"}, {"name": "r"}]}}, "imagePullSecrets names must be unique"),
    ("service-account-bad-name", "sft", {"spec.podTemplate": {"serviceAccountName": "Trainer SA"}}, "spec.podTemplate.serviceAccountName"),
    ("service-account-name-and-annotations", "sft", {"spec.podTemplate": {"serviceAccountName": "gke-trainer",
     "serviceAccountAnnotations": {"iam.gke.io/gcp-service-account": "t@p.iam.gserviceaccount.com"}}}, "not with serviceAccountName"),
    ("service-account-annotation-key", "sft", {"spec.podTemplate": {"serviceAccountAnnotations": {"role arn": "x"}}}, "serviceAccountAnnotations keys must be qualified names"),
    ("service-account-annotation-long", "sft", {"spec.podTemplate": {"serviceAccountAnnotations": {"a/b": "x" * 4097}}}, "spec.podTemplate.serviceAccountAnnotations.a/b"),
    ("extra-resource-gpu", "sft", {"spec.resources.extra": {"nvidia.com/gpu": "8"}}, "resources.extra: cpu, memory and nvidia.com/gpu are set by their own fields"),
    ("extra-resource-quantity", "sft", {"spec.resources.extra": {"rdma/ib": "one"}}, "spec.resources.extra.rdma/ib"),
    ("extra-resource-name", "sft", {"spec.resources.extra": {"rdma ib": "1"}}, "resources.extra: names must be qualified names"),
    ("work-volume-type", "sft", {"spec.podTemplate": {"workVolume": {"type": "hostPath"}}}, "spec.podTemplate.workVolume.type"),
    ("work-volume-size", "sft", {"spec.podTemplate": {"workVolume": {"size": "lots"}}}, "spec.podTemplate.workVolume.size"),
    ("work-volume-claim-missing", "sft", {"spec.podTemplate": {"workVolume": {"type": "persistentVolumeClaim"}}}, "claimName is set exactly when type is persistentVolumeClaim"),
    ("work-volume-claim-on-empty-dir", "sft", {"spec.podTemplate": {"workVolume": {"claimName": "scratch"}}}, "claimName is set exactly when type is persistentVolumeClaim"),
    ("work-volume-class-on-empty-dir", "sft", {"spec.podTemplate": {"workVolume": {"storageClassName": "nvme"}}}, "storageClassName needs type ephemeral"),
    ("security-run-as-root", "sft", {"spec.podTemplate": {"securityContext": {"runAsUser": 0}}}, "spec.podTemplate.securityContext.runAsUser"),
    ("security-run-as-non-root-off", "sft", {"spec.podTemplate": {"securityContext": {"runAsNonRoot": False}}},
     'unknown field "spec.podTemplate.securityContext.runAsNonRoot"'),
    ("security-escalation", "sft", {"spec.podTemplate": {"securityContext": {"allowPrivilegeEscalation": True}}},
     'unknown field "spec.podTemplate.securityContext.allowPrivilegeEscalation"'),
    ("security-drop-nothing", "sft", {"spec.podTemplate": {"securityContext": {"capabilities": {"drop": []}}}},
     'unknown field "spec.podTemplate.securityContext.capabilities.drop"'),
    ("security-capability-name", "sft", {"spec.podTemplate": {"securityContext": {"capabilities": {"add": ["ipc_lock"]}}}},
     "spec.podTemplate.securityContext.capabilities.add[0]"),
    ("security-privileged-not-bool", "sft", {"spec.podTemplate": {"securityContext": {"privileged": "yes"}}}, "spec.podTemplate.securityContext.privileged"),
    ("host-network-not-bool", "sft", {"spec.podTemplate": {"hostNetwork": "yes"}}, "spec.podTemplate.hostNetwork"),
    ("host-ipc-not-bool", "sft", {"spec.podTemplate": {"hostIPC": "yes"}}, "spec.podTemplate.hostIPC"),
    ("host-pid", "sft", {"spec.podTemplate": {"hostPID": True}}, 'unknown field "spec.podTemplate.hostPID"'),
    ("name-too-long", "sft", {"metadata.name": "a" * 51}, "metadata.name must be at most 50 characters"),
    ("name-leading-digit", "sft", {"metadata.name": "7-sft"}, "start with a letter"),
    ("policy-unknown-algorithm", "rlaif", {"spec.policy.algorithm": "trpo"}, "spec.policy.algorithm"),
    ("policy-indivisible-batch", "rlaif", {"spec.policy.algorithm": "grpo", "spec.policy.generationsPerPrompt": 4,
                                           "spec.policy.training.microBatchSize": 3}, "must be divisible by generationsPerPrompt"),
    ("ppo-epochs-zero", "rlaif", {"spec.policy.ppo.epochs": 0}, "spec.policy.ppo.epochs"),
    ("ppo-clip-range-zero", "rlaif", {"spec.policy.ppo.clipRange": 0}, "spec.policy.ppo.clipRange"),
    ("ppo-lam-above-one", "rlaif", {"spec.policy.ppo.lam": 1.5}, "spec.policy.ppo.lam"),
    ("ppo-kl-target-negative", "rlaif", {"spec.policy.ppo.klTarget": -1}, "spec.policy.ppo.klTarget"),
    ("policy-lora-rank-zero", "rlaif", {"spec.policy.lora": {"r": 0}}, "spec.policy.lora.r"),
    ("forced-verdicts-not-bool", "rlaif", {"spec.feedback.useForcedVerdicts": "perhaps"}, "spec.feedback.useForcedVerdicts"),
    ("judge-two-sources", "rlaif", {"spec.feedback.judge.endpoint": {"baseUrl": "https://j/v1", "model": "m"}}, "judge: set exactly one of model and endpoint"),
    ("samples-per-prompt-one", "rlaif", {"spec.feedback.samplesPerPrompt": 1}, "spec.feedback.samplesPerPrompt"),
    ("judge-url-ftp", "rlaif", {"spec.feedback.judge": {"endpoint": {"baseUrl": "ftp://j", "model": "m"}}}, "spec.feedback.judge.endpoint.baseUrl"),
    ("unknown-suite", "eval", {"spec.evaluation.suites": ["mmlu"]}, "spec.evaluation.suites[0]"),
    ("open-ended-without-judge", "eval", {"spec.evaluation.judge": DELETE}, "open-ended suites (vicuna-80, alpaca-eval) need judge"),
    ("duplicate-suites", "eval", {"spec.evaluation.suites": ["acva", "acva"]}, "suites must not repeat"),
    ("shots-six", "eval", {"spec.evaluation.shots": 6}, "spec.evaluation.shots"),
    ("runs-zero", "eval", {"spec.evaluation.runs": 0}, "spec.evaluation.runs"),
    ("limit-per-topic", "eval", {"spec.evaluation.limitPer": "topic"}, "spec.evaluation.limitPer"),
    ("seed-negative", "eval", {"spec.evaluation.seed": -1}, "spec.evaluation.seed"),
    ("open-metric-unknown", "eval", {"spec.evaluation.openEndedMetrics": ["win-rate"]}, "spec.evaluation.openEndedMetrics[0]"),
    ("open-metrics-repeat", "eval", {"spec.evaluation.openEndedMetrics": ["judge-scores", "judge-scores"]}, "openEndedMetrics must not repeat"),
    ("compare-name-upper", "eval", {"spec.evaluation.compare.0.name": "Base"}, "spec.evaluation.compare[0].name"),
    ("compare-names-repeat", "eval", {"spec.evaluation.compare": [{"name": "base", "model": {"uri": "s3://dhad-demo/a"}}, {"name": "base", "model": {"uri": "s3://dhad-demo/b"}}]}, "compare names must be unique"),
    ("compare-model-no-source", "eval", {"spec.evaluation.compare.0.model": {"dtype": "auto"}}, "set exactly one of uri and fromJob"),
    ("min-over-max-chars", "pretrain", {"spec.data.filters.maxChars": 10}, "minChars must not exceed maxChars"),
    ("dedup-threshold", "pretrain", {"spec.data.dedup": {"threshold": 1.5}}, "spec.data.dedup.threshold"),
    ("vocab-negative", "pretrain", {"spec.vocabulary.newTokens": -5}, "spec.vocabulary.newTokens"),
    ("tokens-and-steps", "pretrain", {"spec.training.maxTokens": 1000000}, "at most one of maxTokens, maxSteps and epochs"),
    ("no-sources", "pretrain", {"spec.data.sources": []}, "spec.data.sources"),
    ("source-weight-zero", "pretrain", {"spec.data.sources": [{"uri": "s3://bkt/x", "weight": 0}]}, "spec.data.sources[0].weight"),
    ("source-names-repeat", "pretrain", {"spec.data.sources": [{"uri": "s3://bkt/x", "name": "ar"}, {"uri": "s3://bkt/y", "name": "ar"}]},
     "data.sources: names must be unique"),
    ("source-name-not-dns", "pretrain", {"spec.data.sources": [{"uri": "s3://bkt/x", "name": "Arabic Web"}]}, "spec.data.sources[0].name"),
    ("language-code", "pretrain", {"spec.data.filters.languages": ["Arabic"]}, "spec.data.filters.languages[0]"),
    ("source-language-code", "pretrain", {"spec.data.sources": [{"uri": "s3://bkt/x", "filters": {"languages": ["EN"]}}]},
     "spec.data.sources[0].filters.languages[0]"),
    ("workers-zero", "pretrain", {"spec.data.workers": 0}, "spec.data.workers"),
    ("split-too-small", "pretrain", {"spec.data.splitMegabytes": 0}, "spec.data.splitMegabytes"),
    ("vocab-sample-zero", "pretrain", {"spec.vocabulary.sampleMegabytes": 0}, "spec.vocabulary.sampleMegabytes"),
    ("vocab-warmup-negative", "pretrain", {"spec.vocabulary.warmupSteps": -1}, "spec.vocabulary.warmupSteps"),
    ("vocab-warmup-deepspeed", "pretrain", {"spec.vocabulary.warmupSteps": 5, "spec.distributed": {"strategy": "deepspeed"}},
     "vocabulary.warmupSteps needs distributed.strategy ddp"),
    ("vocab-warmup-no-tokens", "pretrain", {"spec.vocabulary": {"warmupSteps": 5}}, "vocabulary.warmupSteps needs vocabulary.newTokens"),
    ("tracking-uri-not-url", "sft", {"spec.tracking.mlflow": {"trackingUri": "mlflow.local:5000"}}, "spec.tracking.mlflow.trackingUri"),
    ("wandb-without-project", "sft", {"spec.tracking.wandb": {"entity": "team"}}, "spec.tracking.wandb.project"),
    ("hub-repo-without-org", "sft", {"spec.output.hub": {"repoId": "model", "tokenSecretRef": {"name": "hf", "key": "token"}}}, "spec.output.hub.repoId"),
    ("hub-without-token", "sft", {"spec.output.hub": {"repoId": "org/model"}}, "spec.output.hub.tokenSecretRef"),
    ("license-with-spaces", "sft", {"spec.output.license": "Apache 2.0"}, "spec.output.license"),
    ("eval-pushes-to-hub", "eval", {"spec.output.hub": {"repoId": "org/m", "tokenSecretRef": {"name": "hf", "key": "token"}}}, "an EvalJob has no model to push"),
    # every URI field is checked as a model URI is: scheme, bucket, no "." or ".." segment, no whitespace
    ("model-uri-dotdot", "sft", {"spec.model": {"uri": "s3://dhad-demo/../models/x"}}, "spec.model.uri"),
    ("tokenizer-uri-whitespace", "pretrain", {"spec.model.tokenizer": "s3://dhad-demo/tok enizer"}, "spec.model.tokenizer"),
    ("resume-from-dotdot", "sft", {"spec.checkpoint.resumeFrom": "s3://dhad-demo/ckpt/../../x"}, "spec.checkpoint.resumeFrom"),
    ("data-uri-no-bucket", "sft", {"spec.data.0.uri": "s3://"}, "spec.data[0].uri"),
    ("data-uri-dotdot", "sft", {"spec.data.0.uri": "s3://b/../../etc"}, "spec.data[0].uri"),
    ("data-uri-dotdot-in-key", "sft", {"spec.data.0.uri": "s3://dhad-demo/data/../../etc"}, "spec.data[0].uri"),
    ("data-uri-whitespace", "sft", {"spec.data.0.uri": "s3://my bucket/x y"}, "spec.data[0].uri"),
    ("data-uri-key-whitespace", "sft", {"spec.data.0.uri": "s3://dhad-demo/x y.jsonl"}, "spec.data[0].uri"),
    ("data-uri-unknown-scheme", "sft", {"spec.data.0.uri": "gs://dhad-demo/x.jsonl"}, "spec.data[0].uri"),
    ("data-uri-one-slash", "sft", {"spec.data.0.uri": "s3:/dhad-demo/x.jsonl"}, "spec.data[0].uri"),
    ("respond-prompts-uri-dotdot", "sft", {"spec.respond": {
        "prompts": [{"uri": "s3://dhad-demo/../p.jsonl", "schema": "prompt-completion"}],
        "teacher": {"endpoint": {"baseUrl": "https://teacher/v1", "model": "t"}}}}, "spec.respond.prompts[0].uri"),
    ("feedback-prompts-uri-no-bucket", "rlaif", {"spec.feedback.prompts.0.uri": "s3://"}, "spec.feedback.prompts[0].uri"),
    ("feedback-prompts-uri-whitespace", "rlaif", {"spec.feedback.prompts.0.uri": "s3://dhad-demo/my prompts.jsonl"}, "spec.feedback.prompts[0].uri"),
    ("culture-set-malformed", "rlaif", {"spec.reward.cultureSet": "S3://dhad-demo/culture.jsonl"}, "spec.reward.cultureSet"),
    ("reward-benchmarks-whitespace", "rlaif", {"spec.reward.benchmarks": "s3://dhad-demo/bench marks"}, "spec.reward.benchmarks"),
    ("pretrain-source-dotdot", "pretrain", {"spec.data.sources.0.uri": "s3://dhad-demo/data/.."}, "spec.data.sources[0].uri"),
    ("decontamination-uri-whitespace", "pretrain", {"spec.data.decontamination": {"benchmarks": ["s3://dhad-demo/exam test.jsonl"]}}, "spec.data.decontamination.benchmarks[0]"),
    ("vocabulary-corpus-dotdot", "pretrain", {"spec.vocabulary.corpus": "s3://dhad-demo/./corpus.txt"}, "spec.vocabulary.corpus"),
    ("benchmarks-uri-dotdot", "eval", {"spec.evaluation.benchmarks": "s3://dhad-demo/benchmarks/../.."}, "spec.evaluation.benchmarks"),
    ("reference-answers-no-bucket", "eval", {"spec.evaluation.referenceAnswers": "s3://"}, "spec.evaluation.referenceAnswers"),
    # Pipelines: stages reference earlier stages by fromJob (stage 0 pretrain, 1 sft with a gate, 2 rlaif with a gate, 3 eval)
    ("pipeline-unknown-stage", "pipeline", {"spec.stages.1.sft.model.fromJob.name": "pretrian"},
     "spec.stages[].sft.model.fromJob.name: names no stage of this pipeline"),
    ("pipeline-cycle", "pipeline", {"spec.stages.1.sft.model.fromJob": {"kind": "RLAIFJob", "name": "rlaif"}},
     "spec.stages[].sft.model.fromJob.name: must name an earlier stage"),
    ("pipeline-self-reference", "pipeline", {"spec.stages.0.pretrain.model": {"fromJob": {"kind": "PretrainJob", "name": "pretrain"}}},
     "spec.stages[].pretrain.model.fromJob.name: must name an earlier stage"),
    ("pipeline-kind-mismatch", "pipeline", {"spec.stages.2.rlaif.model.fromJob.kind": "PretrainJob"},
     "spec.stages[].rlaif.model.fromJob.name: fromJob.kind must be the kind of the stage it names"),
    ("pipeline-judge-kind-mismatch", "pipeline", {"spec.stages.3.eval.evaluation.judge.model.fromJob.kind": "RLAIFJob"},
     "spec.stages[].eval.evaluation.judge.model.fromJob.name: fromJob.kind must be"),
    ("pipeline-model-from-eval-stage", "pipeline", {"spec.stages.3.eval.model.fromJob": {"kind": "EvalJob", "name": "eval"}},
     "an EvalJob has no output model"),
    ("pipeline-gate-score-not-produced", "pipeline", {"spec.stages.1.gate.require.0.score": "arabic-mmlu/loglikelihood"},
     "gate: require[].score must be a score the gate's evaluation produces"),
    ("pipeline-gate-score-other-method", "pipeline", {"spec.stages.1.gate.require.0.score": "acva/generate"},
     "gate: require[].score must be a score the gate's evaluation produces"),
    ("pipeline-gate-without-threshold", "pipeline", {"spec.stages.1.gate.require.0": {"score": "acva/loglikelihood"}},
     "a condition needs atLeast, atMost or maxDrop"),
    ("pipeline-gate-on-eval-stage", "pipeline", {"spec.stages.3.gate": {"evaluation": {"suites": ["acva"]}, "require": [{"score": "acva/generate", "atLeast": 0.5}]}},
     "a gate needs a stage that outputs a model"),
    ("pipeline-two-kinds-in-a-stage", "pipeline", {"spec.stages.3.sft": {"model": {"uri": "s3://dhad-demo/m"}, "data": [{"uri": "/d.jsonl"}]}},
     "set exactly one of pretrain, sft, rlaif and eval"),
    ("pipeline-duplicate-stage-names", "pipeline", {"spec.stages.3.name": "sft"}, "stages: names must be unique"),
    ("pipeline-stage-name-too-long", "pipeline", {"spec.stages.3.name": "e" * 17}, "spec.stages[3].name"),
    ("pipeline-no-storage", "pipeline", {"spec.defaults.storage": DELETE}, "defaults.storage: set storage here or in every stage"),
    ("pipeline-no-stages", "pipeline", {"spec.stages": []}, "spec.stages"),
    ("pipeline-stage-suspended", "pipeline", {"spec.stages.1.sft.suspend": True}, "set the Pipeline's spec.suspend"),
    ("pipeline-unknown-stage-field", "pipeline", {"spec.stages.1.sft.gpus": 8}, 'unknown field "spec.stages[1].sft.gpus"'),
    ("name-pipeline-too-long", "pipeline", {"metadata.name": "p" * 22}, "metadata.name must be at most 21 characters"),
]


@pytest.mark.parametrize("name", ["pretrain", "sft", "rlaif", "eval", "pipeline"])
def test_example_is_accepted_and_stored_as_the_models_default_it(kube, crds_installed, namespace, name):
    doc = example(name)
    stored = create(kube, namespace, doc)
    assert stored["spec"] == parse(doc).to_json_dict()


def test_gpu_examples_are_accepted(kube, crds_installed, namespace):
    for path in sorted((REPO / "examples" / "gpu").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        stored = create(kube, namespace, doc)
        assert stored["spec"] == parse(doc).to_json_dict(), path.name


def test_the_table_has_forty_distinct_cases():
    assert len({case[0] for case in BAD}) == len(BAD) >= 40


@pytest.mark.parametrize("case,base,changes,fragment", BAD, ids=[c[0] for c in BAD])
def test_bad_manifest_is_rejected_naming_the_field(kube, crds_installed, namespace, case, base, changes, fragment):
    doc = mutate(example(base), changes)
    with pytest.raises(ApiException) as rejected:
        create(kube, namespace, doc)
    assert rejected.value.status in (400, 422), rejected.value.body
    message = json.loads(rejected.value.body)["message"]
    assert fragment in message, message
    if not case.startswith("name-"):  # the apiserver alone sees metadata.name
        assert_python_rejects_the_same_field(doc, fragment, message)


def error_path(loc: tuple) -> str:
    """A pydantic error location written as the apiserver writes a field: spec.data[0].uri."""
    return "spec" + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)


def assert_python_rejects_the_same_field(doc: dict, fragment: str, apiserver_message: str) -> None:
    """The Python models (local mode has no apiserver) reject the spec for the same field: the field the
    fragment names, or, for a rule's message, that message at a path the apiserver names too."""
    with pytest.raises(ValidationError) as rejected:
        parse(doc)
    errors = [(error_path(e["loc"]), e["type"], e["msg"]) for e in rejected.value.errors()]
    # a map key that fails its pattern: pydantic names the key, the apiserver's rule the map
    bad_keys = [error_path(e["loc"][:-2]) for e in rejected.value.errors() if e["loc"][-1:] == ("[key]",)]
    unknown = re.fullmatch(r'unknown field "(.+)"', fragment)
    if unknown:
        agree = any(path == unknown.group(1) and kind == "extra_forbidden" for path, kind, _ in errors)
    elif re.fullmatch(r"spec(\.[\w/-]+|\[\d+\])+", fragment):  # map keys (rdma/ib) are path parts too
        agree = any(path == fragment for path, _, _ in errors)
    elif bad_keys:
        agree = any(f"{path}: Invalid value: " in apiserver_message for path in bad_keys)
    else:  # a rule: the apiserver reports it at the model's path plus the rule's fieldPath
        agree = any(fragment in msg and f"{path}{rule_field(msg)}: " in apiserver_message for path, _, msg in errors)
    assert agree, f"Python: {errors}; apiserver: {apiserver_message}"


def rule_field(message: str) -> str:
    """The fieldPath (".zeroStage") of the API rules whose message this is, or "" when they have none
    (one message may belong to several rules, such as the jobs' and a pipeline's env rule, at one path)."""
    def models(cls: type) -> list[type]:
        return [cls, *(m for sub in cls.__subclasses__() for m in models(sub))]

    [path] = {r.field_path or "" for model in models(RuledModel) for r in model.rules if message.endswith(r.message)}
    return path


def test_spec_is_immutable_except_suspend(kube, crds_installed, namespace):
    doc = example("sft")
    create(kube, namespace, doc)
    custom = client.CustomObjectsApi(kube)
    args = ("dhad.dev", "v1alpha1", namespace, "sftjobs", doc["metadata"]["name"])
    custom.patch_namespaced_custom_object(*args, {"spec": {"suspend": True}})
    assert custom.get_namespaced_custom_object(*args)["spec"]["suspend"] is True
    for patch, fragment in [
        ({"spec": {"resources": {"nodes": 4}}}, "spec.resources: Invalid value"),
        ({"spec": {"training": {"learningRate": 0.1}}}, "spec.training: Invalid value"),
        ({"spec": {"queueName": "team-a"}}, "cannot be added or removed after creation"),
    ]:
        with pytest.raises(ApiException) as rejected:
            custom.patch_namespaced_custom_object(*args, patch)
        assert rejected.value.status == 422, rejected.value.body
        assert fragment in rejected.value.body, rejected.value.body
        assert "immutable" in rejected.value.body or "cannot be added" in fragment, rejected.value.body


def test_kubectl_get_dhad_lists_every_kind_with_printer_columns(kube, crds_installed, namespace, control_plane):
    from tests.harness.controlplane import kubectl

    for name in ["pretrain", "sft", "rlaif", "eval", "pipeline"]:
        create(kube, namespace, example(name))
    out = kubectl(control_plane, "get", "dhad", "-n", namespace).stdout
    for kind, name in [("pretrainjob", "tiny-pretrain"), ("sftjob", "tiny-sft"), ("rlaifjob", "tiny-rlaif"), ("evaljob", "tiny-eval"),
                       ("pipeline", "tiny-recipe")]:
        assert f"{kind}.dhad.dev/{name}" in out
    header = out.splitlines()[0].split()
    assert header[:2] == ["NAME", "STATE"] and "NODES" in header and "RESTARTS" in header and "AGE" in header
    pipelines = kubectl(control_plane, "get", "pipelines", "-n", namespace).stdout.splitlines()
    assert pipelines[0].split() == ["NAME", "STATE", "STAGE", "PROGRESS", "AGE"] and pipelines[1].startswith("tiny-recipe")
