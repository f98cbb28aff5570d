"""Operator settings from its environment (the Helm chart sets them)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from dhad_operator.render import Defaults


@dataclass(frozen=True)
class Settings:
    defaults: Defaults
    metrics_port: int
    resync_seconds: float
    leader_election: bool
    lease_name: str
    lease_namespace: str
    lease_seconds: int
    identity: str

    @classmethod
    def from_env(cls, env=os.environ) -> Settings:
        return cls(
            defaults=Defaults(trainer_image=env.get("DHAD_TRAINER_IMAGE", Defaults.trainer_image)),
            metrics_port=int(env.get("DHAD_METRICS_PORT", "8080")),
            resync_seconds=float(env.get("DHAD_RESYNC_SECONDS", "60")),
            leader_election=env.get("DHAD_LEADER_ELECTION", "false").lower() == "true",
            lease_name=env.get("DHAD_LEASE_NAME", "dhad-operator"),
            lease_namespace=env.get("POD_NAMESPACE", "dhad-system"),
            lease_seconds=int(env.get("DHAD_LEASE_DURATION_SECONDS", "15")),
            identity=env.get("POD_NAME", os.uname().nodename),
        )
