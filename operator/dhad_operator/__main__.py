"""`python -m dhad_operator`: health and metrics, watch caches, leader election, the work queue."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

from kubernetes import client, config

from dhad_operator import metrics
from dhad_operator.config import Settings, log_level
from dhad_operator.controller import Controller
from dhad_operator.handlers import Router
from dhad_operator.health import HEALTH
from dhad_operator.k8s import Kube, Rest
from dhad_operator.leader import LeaderElector, timings

log = logging.getLogger("dhad.operator")


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


def api_client(pool_size: int) -> client.ApiClient:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    configuration = client.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = pool_size
    return client.ApiClient(configuration)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dhad-operator")
    parser.add_argument("--liveness", default="http://0.0.0.0:8081/healthz", help="where /healthz and /readyz are served")
    parser.add_argument("--namespace", action="append", default=[], help="watch only these namespaces (default: all, or DHAD_WATCH_NAMESPACES)")
    parser.add_argument("--log-level", default=os.environ.get("DHAD_LOG_LEVEL", "INFO"))
    parser.add_argument("--workers", type=int, default=int(os.environ.get("DHAD_WORKERS", "8")),
                        help="reconciles at once (never two of one job); default DHAD_WORKERS or 8")
    args = parser.parse_args(argv)
    namespaces = args.namespace or [n for n in os.environ.get("DHAD_WATCH_NAMESPACES", "").split(",") if n]
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=log_level(args.log_level), handlers=[handler], force=True)
    settings = Settings.from_env()
    metrics.serve(settings.metrics_port, settings.metrics_address)

    _, _, request_timeout = timings(settings.lease_seconds)  # every API call ends within the lease
    rest = Rest(api_client(pool_size=64), request_timeout, on_request=lambda verb: metrics.API_REQUESTS.labels(verb).inc())
    elector: LeaderElector | None = None
    kube = Kube(rest, namespaces, may_write=lambda: elector is None or elector.may_write(), crash=os.environ.get("DHAD_TEST_CRASH"))
    controller = Controller(kube, settings.defaults, settings.resync_seconds, workers=args.workers,
                            is_leader=lambda: elector is None or elector.may_write())
    if settings.leader_election:
        elector = LeaderElector(kube, settings.lease_name, settings.lease_namespace, settings.identity, settings.lease_seconds,
                                on_started=controller.enqueue_all)
    else:
        metrics.LEADER.set(1)
    metrics.QUEUE_LONGEST.set_function(controller.queue.longest_running)
    HEALTH.ready = kube.synced
    HEALTH.problems = [lambda: kube.stalled(400.0), controller.wedged, *([elector.wedged] if elector else [])]
    HEALTH.serve(args.liveness)

    kube.start(Router(kube, controller.queue).on_change)
    controller.start()
    if elector:
        elector.start()
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    stopping.wait()
    log.info("stopping")
    controller.stop()
    if elector:
        elector.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
