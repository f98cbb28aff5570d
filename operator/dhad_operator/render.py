"""Pure renderers: a job object (and what the operator resolved) -> the child manifests it needs.

No API calls here: every function maps inputs to dicts, so they are table-tested without a cluster.
Names are deterministic (dhad_api.naming), every child carries an ownerReference to the job and the
labels `dhad.dev/job`, `dhad.dev/kind`, `dhad.dev/stage`, `dhad.dev/attempt`. One object is not a
child: the namespace's headless Service (`worker_service`), which no job owns.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field

from dhad_api.common import StorageSecret, WorkVolumeType
from dhad_api.jobs import (
    API_VERSION,
    KINDS,
    JobSpec,
    KindInfo,
    RLAIFJobSpec,
    SFTJobSpec,
    StagePods,
    stage_pods,
)
from dhad_api.naming import WORKER_SERVICE, config_map_name, job_name, master_address
from dhad_api.outputs import secret_env_refs
from dhad_api.queueing import QUEUE_NAME_LABEL, kueue_labels
from dhad_api.reasons import NAMESPACE_ENV, NO_RETRY, PROGRESS_CONFIGMAP_ENV, PROGRESS_KEY

LABEL_JOB = "dhad.dev/job"
LABEL_KIND = "dhad.dev/kind"
LABEL_STAGE = "dhad.dev/stage"
LABEL_ATTEMPT = "dhad.dev/attempt"
LABEL_WORKER = "dhad.dev/worker"  # on every worker pod: what the namespace's Service selects
MANAGED_BY_LABEL, MANAGED_BY = "app.kubernetes.io/managed-by", "dhad-operator"  # marks the Service as ours
KUEUE_QUEUE_LABEL = QUEUE_NAME_LABEL
MASTER_PORT = 29500
JOB_FILE_DIR = "/etc/dhad"
JOB_FILE = f"{JOB_FILE_DIR}/job.json"
WORK_DIR = "/var/lib/dhad/work"  # the work volume; DHAD_WORK_DIR points here


@dataclass(frozen=True)
class Owner:
    """The job object the children belong to."""

    kind: str
    name: str
    namespace: str
    uid: str
    kueue: tuple[tuple[str, str], ...] = ()  # the job's own Kueue labels (queue-name, priority-class)

    @property
    def info(self) -> KindInfo:
        return next(i for i in KINDS.values() if i.kind.value == self.kind)

    def reference(self) -> dict:
        return {"apiVersion": API_VERSION, "kind": self.kind, "name": self.name, "uid": self.uid,
                "controller": True, "blockOwnerDeletion": True}

    def labels(self) -> dict[str, str]:
        return {LABEL_JOB: self.name, LABEL_KIND: self.kind}


@dataclass(frozen=True)
class Defaults:
    """Operator-wide defaults from its configuration (Helm values, through config.Settings)."""

    trainer_image: str = "ghcr.io/dhad/trainer:0.1.0"
    service_account_tokens: bool = True
    # storage.endpoint / storage.secretName: for jobs whose spec.storage leaves them empty
    storage_endpoint: str | None = None
    storage_secret: str | None = None
    # trainer.serviceAccount.annotations: on every per-job ServiceAccount, under the job's own
    service_account_annotations: dict[str, str] = field(default_factory=dict)
    # trainer.allowPrivileged: privileged containers, host namespaces and hostPath volumes
    allow_privileged: bool = False


def kueue(owner: Owner, spec: JobSpec) -> dict[str, str]:
    """The Kueue labels each sub-stage's Job carries: the job's own label, else spec.queueName."""
    return kueue_labels(dict(owner.kueue), spec.queue_name)


def _meta(owner: Owner, name: str, extra_labels: dict | None = None) -> dict:
    return {"name": name, "namespace": owner.namespace, "labels": {**owner.labels(), **(extra_labels or {})},
            "ownerReferences": [owner.reference()]}


def progress_config_map_name(owner: Owner) -> str:
    return f"{config_map_name(owner.name, owner.info.code)[: -len('-spec')]}-progress"


def trainer_service_account_name(owner: Owner) -> str:
    return f"{owner.name}-{owner.info.code}-trainer"


def job_config_map(owner: Owner, spec: JobSpec, resolved: dict) -> dict:
    """The validated spec (defaults applied) as /etc/dhad/job.json, with what the operator resolved."""
    document = {"apiVersion": API_VERSION, "kind": owner.kind,
                "metadata": {"name": owner.name, "namespace": owner.namespace, "uid": owner.uid},
                "spec": spec.to_json_dict(), "resolved": resolved}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(owner, config_map_name(owner.name, owner.info.code)),
            "data": {"job.json": json.dumps(document, ensure_ascii=False, sort_keys=True)}}


def worker_service(namespace: str) -> dict:
    """The namespace's one headless Service, the subdomain of every worker pod: pods resolve
    `<Job>-0.dhad-workers` (the master) even before they are ready. No job owns it (deleting one job
    leaves it to the others) and the operator never deletes it; the label says it is ours."""
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": WORKER_SERVICE, "namespace": namespace, "labels": {MANAGED_BY_LABEL: MANAGED_BY}},
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": {LABEL_WORKER: "true"},
                     "ports": [{"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT}]}}


def namespace_children(namespace: str) -> list[dict]:
    """What every job in a namespace needs and none owns, made by whichever job finds it missing."""
    return [worker_service(namespace)]


def namespace_child_names() -> list[tuple[str, str]]:
    """(kind, name) of namespace_children."""
    return [("Service", WORKER_SERVICE)]


def managed_by_us(obj: dict) -> bool:
    """An object of namespace_children is ours by its label (it has no owner to tell)."""
    return ((obj.get("metadata") or {}).get("labels") or {}).get(MANAGED_BY_LABEL) == MANAGED_BY


def pods_service_account(owner: Owner, spec: JobSpec) -> str:
    """The trainer pods' ServiceAccount: the one the spec names, else the per-job one."""
    return spec.pod_template.service_account_name or trainer_service_account_name(owner)


def progress_objects(owner: Owner, spec: JobSpec | None = None, defaults: Defaults | None = None) -> list[dict]:
    """A per-job ConfigMap that only the pods' ServiceAccount may patch (rank 0 reports progress), and
    that ServiceAccount (unless the spec names an existing one) with the workload-identity annotations."""
    defaults = defaults or Defaults()
    cm, role = progress_config_map_name(owner), trainer_service_account_name(owner)
    pod = spec.pod_template if spec is not None else None
    subject = pods_service_account(owner, spec) if spec is not None else role
    objects = [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(owner, cm), "data": {PROGRESS_KEY: "{}"}}]
    if pod is None or not pod.service_account_name:
        meta = _meta(owner, role)
        annotations = {**defaults.service_account_annotations, **(pod.service_account_annotations if pod else {})}
        if annotations:
            meta["annotations"] = annotations
        objects.append({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta})
    return [
        *objects,
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": _meta(owner, role),
         "rules": [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [cm], "verbs": ["get", "patch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": _meta(owner, role),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
         "subjects": [{"kind": "ServiceAccount", "name": subject, "namespace": owner.namespace}]},
    ]


def needed_before_the_job(manifest: dict) -> bool:
    """What a Job's pods need to start: the spec ConfigMap (mounted), the ServiceAccount (pod admission),
    the namespace's Service (the master's hostname). The progress ConfigMap and its Role and RoleBinding
    are needed only at rank 0's first progress report, which is retried, so they are made after the
    Job, off its path: at 500 jobs at once that path is the apiserver's queue."""
    if manifest["kind"] in ("Role", "RoleBinding"):
        return False
    return not (manifest["kind"] == "ConfigMap" and PROGRESS_KEY in (manifest.get("data") or {}))


def static_children(owner: Owner, spec: JobSpec, resolved: dict, defaults: Defaults | None = None) -> list[dict]:
    """Everything the job owns but the Jobs (none depends on another: they are created together)."""
    return [job_config_map(owner, spec, resolved), *progress_objects(owner, spec, defaults)]


def refused_pod_fields(spec: JobSpec, defaults: Defaults) -> str | None:
    """Why the platform refuses this spec's pods (privileged, host namespaces, hostPath), naming the
    fields; None when it does not. The CRD cannot know the platform switch, so the operator checks."""
    fields = spec.pod_template.refused(defaults.allow_privileged)
    if not fields:
        return None
    return (f"{', '.join(fields)}: not allowed on this platform (the operator's Helm value trainer.allowPrivileged "
            "is false); remove them or ask the platform team")


def static_child_names(owner: Owner, spec: JobSpec | None = None) -> list[tuple[str, str]]:
    """(kind, name) of static_children, without rendering them (checked on every reconcile)."""
    code, trainer = owner.info.code, trainer_service_account_name(owner)
    own_account = spec is None or not spec.pod_template.service_account_name  # else the spec names an existing one
    return [("ConfigMap", config_map_name(owner.name, code)), ("ConfigMap", progress_config_map_name(owner)),
            *([("ServiceAccount", trainer)] if own_account else []), ("Role", trainer), ("RoleBinding", trainer)]


def _secret_env(name: str, ref) -> dict:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def trainer_env(owner: Owner, spec: JobSpec, stage: str, attempt: int, shape: StagePods | None = None,
                defaults: Defaults | None = None) -> list[dict]:
    defaults = defaults or Defaults()
    storage = spec.storage
    shape = shape or stage_pods(owner.kind, spec, stage)
    env = [
        {"name": "MASTER_ADDR", "value": master_address(owner.name, stage, attempt)},
        {"name": "MASTER_PORT", "value": str(MASTER_PORT)},
        {"name": "NNODES", "value": str(shape.pods)},
        {"name": "NPROC_PER_NODE", "value": str(shape.procs_per_pod)},
        {"name": "DHAD_STAGE", "value": stage},
        {"name": "DHAD_ATTEMPT", "value": str(attempt)},
        {"name": "DHAD_JOB_UID", "value": owner.uid},
        {"name": NAMESPACE_ENV, "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": PROGRESS_CONFIGMAP_ENV, "value": progress_config_map_name(owner)},
        {"name": "AWS_REGION", "value": storage.region},
        {"name": "DHAD_WORK_DIR", "value": WORK_DIR},
    ]
    s3_endpoint = storage.endpoint or defaults.storage_endpoint
    if s3_endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": s3_endpoint})
    ref = storage.secret_ref or (StorageSecret(name=defaults.storage_secret) if defaults.storage_secret else None)
    if ref:
        env.append({"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.access_key_id_key}}})
        env.append({"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.secret_access_key_key}}})
    for var, endpoint in _endpoints(spec):
        if endpoint.api_key_secret_ref:
            env.append(_secret_env(var, endpoint.api_key_secret_ref))
    if spec.hf_token_secret_ref:
        env.append(_secret_env("HF_TOKEN", spec.hf_token_secret_ref))
    for var, ref in secret_env_refs(spec.tracking, spec.output):  # W&B, MLflow and Hub tokens
        env.append(_secret_env(var, ref))
    for var in spec.env:
        env.append({"name": var.name, "value": var.value} if var.value is not None
                   else {"name": var.name, "valueFrom": {"secretKeyRef": var.value_from.secret_key_ref.model_dump()}})
    return env


def _endpoints(spec: JobSpec):
    """(env name, Endpoint) for every model endpoint whose key the pod needs."""
    if isinstance(spec, RLAIFJobSpec) and spec.feedback.judge.endpoint:
        yield "DHAD_JUDGE_API_KEY", spec.feedback.judge.endpoint
    if isinstance(spec, SFTJobSpec) and spec.respond and spec.respond.teacher.endpoint:
        yield "DHAD_TEACHER_API_KEY", spec.respond.teacher.endpoint
    evaluation = getattr(spec, "evaluation", None)
    if evaluation is not None and evaluation.judge and evaluation.judge.endpoint:
        yield "DHAD_JUDGE_API_KEY", evaluation.judge.endpoint


RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True,
                        "seccompProfile": {"type": "RuntimeDefault"}}


def _resources(spec: JobSpec, shape: StagePods) -> dict:
    limits: dict[str, str] = dict(spec.resources.extra)
    if shape.gpus_per_pod:
        limits["nvidia.com/gpu"] = str(shape.gpus_per_pod)
    if spec.resources.cpu:
        limits["cpu"] = spec.resources.cpu
    if spec.resources.memory:
        limits["memory"] = spec.resources.memory
    return {"limits": limits, "requests": dict(limits)}


def _affinity(spec: JobSpec, avoid_nodes: list[str]) -> dict | None:
    affinity = dict(spec.pod_template.affinity or {})
    if avoid_nodes:
        term = {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "NotIn", "values": sorted(avoid_nodes)}]}
        node = dict(affinity.get("nodeAffinity") or {})
        required = dict(node.get("requiredDuringSchedulingIgnoredDuringExecution") or {"nodeSelectorTerms": [{}]})
        terms = [{**t, "matchExpressions": [*t.get("matchExpressions", []), *term["matchExpressions"]]}
                 for t in required.get("nodeSelectorTerms") or [{}]]
        node["requiredDuringSchedulingIgnoredDuringExecution"] = {"nodeSelectorTerms": terms}
        affinity["nodeAffinity"] = node
    return affinity or None


def container_security(spec: JobSpec) -> dict:
    """The restricted defaults with the spec's fields merged on; privileged (when the platform allows
    it) is the one case that needs privilege escalation, which Kubernetes then requires."""
    context = copy.deepcopy(RESTRICTED_CONTAINER)
    asked = spec.pod_template.security_context
    if asked is None:
        return context
    if asked.capabilities and asked.capabilities.add:
        context["capabilities"]["add"] = list(asked.capabilities.add)
    for key, value in (("runAsUser", asked.run_as_user), ("runAsGroup", asked.run_as_group),
                       ("readOnlyRootFilesystem", asked.read_only_root_filesystem), ("privileged", asked.privileged)):
        if value is not None:
            context[key] = value
    if asked.is_privileged():
        context["allowPrivilegeEscalation"] = True
    return context


def work_volume(owner: Owner, spec: JobSpec) -> tuple[dict, dict]:
    """(volume, mount) of the trainer's scratch folder at WORK_DIR."""
    work = spec.pod_template.work_volume
    mount = {"name": "work", "mountPath": WORK_DIR}
    if work.type == WorkVolumeType.EPHEMERAL:
        claim = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": work.size}}}
        if work.storage_class_name:
            claim["storageClassName"] = work.storage_class_name
        source = {"ephemeral": {"volumeClaimTemplate": {"metadata": {"labels": owner.labels()}, "spec": claim}}}
    elif work.type == WorkVolumeType.PERSISTENT_VOLUME_CLAIM:
        source = {"persistentVolumeClaim": {"claimName": work.claim_name}}
        mount["subPathExpr"] = f"{owner.name}-{owner.info.code}/$(JOB_COMPLETION_INDEX)"
    else:
        source = {"emptyDir": {"sizeLimit": work.size}}
    return {"name": "work", **source}, mount


def training_job(owner: Owner, spec: JobSpec, stage: str, attempt: int, defaults: Defaults,
                 avoid_nodes: list[str] | None = None) -> dict:
    """One attempt of one (sub-)stage: an Indexed Job of stage_pods(...).pods pods. A gang has no
    per-pod retries (one failed pod ends the attempt); independent pods are retried per index."""
    name = job_name(owner.name, stage, attempt)
    shape = stage_pods(owner.kind, spec, stage)
    labels = {**owner.labels(), LABEL_STAGE: stage, LABEL_ATTEMPT: str(attempt)}
    pod = spec.pod_template
    asked = pod.security_context
    pod_security = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    if asked is not None and asked.fs_group is not None:
        pod_security["fsGroup"] = asked.fs_group
    work, work_mount = work_volume(owner, spec)
    pod_spec = {
        "subdomain": WORKER_SERVICE,  # hostnames <Job>-<index> are unique in the namespace (dhad_api.naming)
        "restartPolicy": "Never",
        "serviceAccountName": pods_service_account(owner, spec),
        "automountServiceAccountToken": defaults.service_account_tokens,
        "securityContext": pod_security,
        "containers": [{
            "name": "trainer",
            "image": spec.image or defaults.trainer_image,
            "command": ["python", "-m", "dhad_trainer", "launch", JOB_FILE],
            "env": trainer_env(owner, spec, stage, attempt, shape, defaults),
            "resources": _resources(spec, shape),
            "ports": [{"name": "rendezvous", "containerPort": MASTER_PORT}],
            "volumeMounts": [{"name": "job", "mountPath": JOB_FILE_DIR, "readOnly": True},
                             {"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"},
                             work_mount, *pod.volume_mounts],
            "securityContext": container_security(spec),
            "terminationMessagePolicy": "FallbackToLogsOnError",
        }],
        "volumes": [{"name": "job", "configMap": {"name": config_map_name(owner.name, owner.info.code)}},
                    {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shared_memory}},
                    {"name": "tmp", "emptyDir": {}}, work, *pod.volumes],
    }
    optional = {"nodeSelector": pod.node_selector or None, "tolerations": [t.to_json_dict() for t in pod.tolerations] or None,
                "affinity": _affinity(spec, avoid_nodes or []), "schedulerName": pod.scheduler_name,
                "priorityClassName": pod.priority_class_name,
                "imagePullSecrets": [s.to_json_dict() for s in pod.image_pull_secrets] or None,
                "hostNetwork": pod.host_network or None, "hostIPC": pod.host_ipc or None,
                # pods on the host network still resolve <Job>-0.dhad-workers (the master) through cluster DNS
                "dnsPolicy": "ClusterFirstWithHostNet" if pod.host_network else None}
    pod_spec.update({k: v for k, v in optional.items() if v})
    job_labels = {**labels, **kueue(owner, spec)}
    pods = shape.pods
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": _meta(owner, name, {LABEL_STAGE: stage, LABEL_ATTEMPT: str(attempt)}) | {"labels": job_labels},
        "spec": {
            "completionMode": "Indexed", "completions": pods, "parallelism": pods,
            **({"backoffLimit": 0} if shape.gang else _retry_per_index(spec)),
            # Kueue admits a queued Job by unsuspending it.
            "suspend": KUEUE_QUEUE_LABEL in job_labels,
            "template": {"metadata": {"labels": {**pod.labels, **labels, LABEL_WORKER: "true"}, "annotations": dict(pod.annotations)},
                         "spec": pod_spec},
        },
    }


def _retry_per_index(spec: JobSpec) -> dict:
    """Independent pods: the Job retries a failed index alone (restartPolicy.maxRestarts times); the
    first index out of retries fails the Job (the others wait on its share); bad config or data fails
    it at once; a disruption is not counted."""
    return {
        "backoffLimitPerIndex": spec.restart_policy.max_restarts,
        "maxFailedIndexes": 0,
        "podFailurePolicy": {"rules": [
            {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                                  "values": sorted(int(c) for c in NO_RETRY)}},
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]},
    }
