"""`python -m dhad_operator`: metrics, leader election, then kopf (standalone: no peering)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import kopf
from kubernetes import client, config

from dhad_operator import metrics
from dhad_operator.config import Settings, log_level
from dhad_operator.controller import Controller
from dhad_operator.health import HEALTH
from dhad_operator.k8s import Kube
from dhad_operator.leader import LeaseLock


class JsonFormatter(logging.Formatter):
    """One JSON object per line: what log pipelines parse."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for key in ("job",):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def api_client() -> client.ApiClient:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    configuration = client.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = 32
    return client.ApiClient(configuration)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dhad-operator")
    parser.add_argument("--liveness", default="http://0.0.0.0:8081/healthz", help="where /healthz and /readyz are served")
    parser.add_argument("--namespace", action="append", default=[], help="watch only these namespaces (default: all, or DHAD_WATCH_NAMESPACES)")
    parser.add_argument("--log-level", default=os.environ.get("DHAD_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    namespaces = args.namespace or [n for n in os.environ.get("DHAD_WATCH_NAMESPACES", "").split(",") if n]
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=log_level(args.log_level), handlers=[handler], force=True)
    settings = Settings.from_env()
    metrics.serve(settings.metrics_port, settings.metrics_address)
    HEALTH.serve(args.liveness)
    api = api_client()
    if settings.leader_election:
        LeaseLock(api, settings.lease_name, settings.lease_namespace, settings.identity, settings.lease_seconds).acquire()
    HEALTH.leading = True
    kube = Kube(api, on_request=lambda verb: metrics.API_REQUESTS.labels(verb).inc())
    from dhad_operator import handlers

    handlers.install(Controller(kube, settings.defaults, settings.resync_seconds))
    kopf.run(standalone=True, clusterwide=not namespaces, namespaces=namespaces)
    return 0


if __name__ == "__main__":
    sys.exit(main())
