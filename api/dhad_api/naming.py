"""Names of the children a job creates, and the longest job name they allow.

A pod's hostname is `<Job name>-<index>` and must fit a 63-character DNS label; the Job name carries
the sub-stage and attempt, so the job's own name is capped at 63 minus the longest suffix. The CRD's
CEL rule and the operator's renderer both use these functions.

Every worker pod's subdomain is one headless Service per namespace (WORKER_SERVICE). Its hostnames
stay unique in the namespace: a hostname is `<name>-<stage code>-<attempt>-<index>`, read from the
end it gives back (name, stage, attempt, index), each stage code belongs to one kind, so two pods
share a hostname only if they belong to the same job, sub-stage, attempt and index.
"""

from __future__ import annotations

STAGE_CODES = {
    "prepare": "dp", "pretrain": "pt", "sft": "sft", "respond": "rsp",
    "feedback": "fb", "reward": "rm", "policy": "po", "eval": "ev",
}
MAX_ATTEMPT = 9999  # four digits
MAX_NODES = 512  # indexes 0..511: three digits
HOSTNAME_LIMIT = 63
LONGEST_SUFFIX = len(f"-{max(STAGE_CODES.values(), key=len)}-{MAX_ATTEMPT}-{MAX_NODES - 1}")
MAX_NAME_LENGTH = HOSTNAME_LIMIT - LONGEST_SUFFIX
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"  # DNS-1035 (a leading letter), as it was when each job had a Service


def job_name(name: str, stage: str, attempt: int) -> str:
    return f"{name}-{STAGE_CODES[stage]}-{attempt}"


WORKER_SERVICE = "dhad-workers"  # the headless Service of every worker pod in a namespace (their subdomain)


def config_map_name(name: str, kind_code: str) -> str:
    return f"{name}-{kind_code}-spec"


def pod_hostname(name: str, stage: str, attempt: int, index: int) -> str:
    return f"{job_name(name, stage, attempt)}-{index}"


def master_address(name: str, stage: str, attempt: int) -> str:
    return f"{pod_hostname(name, stage, attempt, 0)}.{WORKER_SERVICE}"
