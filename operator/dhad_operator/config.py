"""Operator settings from its environment (the Helm chart sets them; charts/dhad/README.md lists them)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from dhad_operator.render import Defaults

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def log_level(text: str | None) -> str:
    """`DHAD_LOG_LEVEL` in any case ("info", "Info") as `logging` names it; an unknown name is an error
    that says what is accepted (logging's own "Unknown level: 'info'" was the chart's crash)."""
    name = (text or "INFO").strip().upper()
    if name == "WARN":
        name = "WARNING"
    if name not in LOG_LEVELS:
        raise ValueError(f"DHAD_LOG_LEVEL={text!r}: use one of {', '.join(n.lower() for n in LOG_LEVELS)} (any case)")
    return name


def _flag(env, name: str, default: bool = False) -> bool:
    value = env.get(name, "")
    return default if value == "" else value.strip().lower() == "true"


def _annotations(env, name: str) -> dict[str, str]:
    """A JSON object of strings (the chart renders `toJson` of a map); empty means none."""
    text = env.get(name, "").strip()
    if not text:
        return {}
    value = json.loads(text)
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError(f"{name} must be a JSON object of strings, got {text[:200]!r}")
    return value


@dataclass(frozen=True)
class Settings:
    defaults: Defaults
    metrics_port: int
    metrics_address: str
    resync_seconds: float
    leader_election: bool
    lease_name: str
    lease_namespace: str
    lease_seconds: int
    identity: str
    log_level: str

    @classmethod
    def from_env(cls, env=os.environ) -> Settings:
        defaults = Defaults(
            trainer_image=env.get("DHAD_TRAINER_IMAGE") or Defaults.trainer_image,
            storage_endpoint=env.get("DHAD_DEFAULT_STORAGE_ENDPOINT") or None,
            storage_secret=env.get("DHAD_DEFAULT_STORAGE_SECRET") or None,
            service_account_annotations=_annotations(env, "DHAD_TRAINER_SERVICE_ACCOUNT_ANNOTATIONS"),
            allow_privileged=_flag(env, "DHAD_ALLOW_PRIVILEGED_PODS"),
        )
        return cls(
            defaults=defaults,
            metrics_port=int(env.get("DHAD_METRICS_PORT", "8080")),
            metrics_address=env.get("DHAD_METRICS_ADDRESS") or "0.0.0.0",
            resync_seconds=float(env.get("DHAD_RESYNC_SECONDS", "60")),
            leader_election=_flag(env, "DHAD_LEADER_ELECTION"),
            lease_name=env.get("DHAD_LEASE_NAME") or "dhad-operator",
            lease_namespace=env.get("POD_NAMESPACE", "dhad-system"),
            lease_seconds=int(env.get("DHAD_LEASE_DURATION_SECONDS", "15")),
            identity=env.get("POD_NAME", os.uname().nodename),
            log_level=log_level(env.get("DHAD_LOG_LEVEL")),
        )
