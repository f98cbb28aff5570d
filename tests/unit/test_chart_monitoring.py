"""The chart's optional monitoring: the Grafana dashboard ConfigMap (sidecar label, the dashboard file
verbatim) and the PrometheusRule (thresholds from values), rendered by the real helm; every metric
the dashboard and the alerts query is one the operator exports, and the ServiceMonitor keeps the
gauges' own job/namespace labels."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.harness.controlplane import control_plane_bin

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "dhad"
DASHBOARD = CHART / "dashboards" / "dhad-jobs.json"


@pytest.fixture(scope="module")
def helm_bin() -> Path:
    return control_plane_bin() / "helm"


def render(helm_bin: Path, tmp_path: Path, *sets: str) -> list[dict]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **{f"HELM_{d}_HOME": str(tmp_path / d.lower()) for d in ("CACHE", "CONFIG", "DATA")}}
    done = subprocess.run([str(helm_bin), "template", "dhad", str(CHART), "-n", "dhad-system",
                           *[f for s in sets for f in ("--set", s)]], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def test_monitoring_is_off_by_default(helm_bin, tmp_path):
    kinds = {d["kind"] for d in render(helm_bin, tmp_path)}
    assert "PrometheusRule" not in kinds and not any(d["kind"] == "ConfigMap" for d in render(helm_bin, tmp_path))


def test_dashboard_configmap_carries_the_sidecar_label_and_the_dashboard(helm_bin, tmp_path):
    docs = render(helm_bin, tmp_path, "monitoring.grafanaDashboard.enabled=true", "monitoring.grafanaDashboard.namespace=monitoring",
                  "monitoring.grafanaDashboard.annotations.grafana_folder=ML")
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1" and cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "ML"}
    assert cm["data"] == {"dhad-jobs.json": DASHBOARD.read_text().rstrip("\n")}
    board = json.loads(cm["data"]["dhad-jobs.json"])
    assert board["uid"] == "dhad-jobs" and len(board["panels"]) >= 8


def test_prometheus_rule_takes_its_thresholds_from_values(helm_bin, tmp_path):
    docs = render(helm_bin, tmp_path, "monitoring.prometheusRule.enabled=true", "monitoring.prometheusRule.noProgressMinutes=45",
                  "monitoring.prometheusRule.restartStorm.restarts=5", "monitoring.prometheusRule.restartStorm.window=30m",
                  "monitoring.prometheusRule.labels.release=kube-prometheus-stack")
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert set(alerts) == {"DhadJobFailed", "DhadJobNoProgress", "DhadJobRestartStorm", "DhadOperatorReconcileErrors"}
    assert "> 2700" in alerts["DhadJobNoProgress"]["expr"]
    assert alerts["DhadJobRestartStorm"]["expr"].endswith("(delta(dhad_job_restarts[30m])) >= 5")
    assert alerts["DhadJobFailed"]["annotations"]["summary"] == "{{ $labels.kind }} {{ $labels.namespace }}/{{ $labels.job }} failed"


def test_service_monitor_honors_the_gauges_labels(helm_bin, tmp_path):
    docs = render(helm_bin, tmp_path, "metrics.serviceMonitor.enabled=true")
    (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True


def queried_metrics(helm_bin, tmp_path) -> set[str]:
    docs = render(helm_bin, tmp_path, "monitoring.prometheusRule.enabled=true")
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    exprs += [r["expr"] for d in docs if d["kind"] == "PrometheusRule" for g in d["spec"]["groups"] for r in g["rules"]]
    words = {w for e in exprs for w in re.findall(r"[a-z_]+(?=\{|\[|\)| |$)", e)}
    return {w for w in words if w.startswith(("dhad_", "process_"))}


def test_dashboard_and_alerts_query_only_exported_metrics(helm_bin, tmp_path):
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from dhad_operator import metrics

    metrics.JOB_STATES.set("SFTJob", "team", "tiny", "Running", {
        "restarts": 1, "stage": "sft", "attemptStartTime": "2026-12-01T11:00:00Z",
        "progress": {"step": 3, "totalSteps": 10, "loss": 1.5, "tokensPerSecond": 100.0, "etaSeconds": 60,
                     "updatedAt": "2026-12-01T12:00:00Z"}})
    metrics.RECONCILE_SECONDS.labels("SFTJob").observe(0.01)
    metrics.ERRORS.labels("SFTJob")
    text = generate_latest(metrics.REGISTRY).decode()
    metrics.JOB_STATES.set("SFTJob", "team", "tiny", None)
    exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert queried_metrics(helm_bin, tmp_path) <= exported, queried_metrics(helm_bin, tmp_path) - exported
    after = {s.name for f in text_string_to_metric_families(generate_latest(metrics.REGISTRY).decode()) for s in f.samples}
    assert not {n for n in after if n.startswith("dhad_job_")}  # a deleted job leaves no series
