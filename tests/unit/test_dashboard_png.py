"""hack/dashboard_png.py: its PromQL subset gives Prometheus' answers on a small recording, and the
committed recording of a kwok run (docs/assets/recorded-metrics.json) fills every dashboard panel."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RECORDING = REPO / "docs" / "assets" / "recorded-metrics.json"
_spec = importlib.util.spec_from_file_location("dashboard_png", REPO / "hack" / "dashboard_png.py")
png = importlib.util.module_from_spec(_spec)
sys.modules["dashboard_png"] = png  # dataclasses look their module up
_spec.loader.exec_module(png)


def recording(tmp_path) -> Path:
    scrapes = []
    for i, t in enumerate((0.0, 60.0, 120.0)):
        samples = [
            ["dhad_job_step", {"namespace": "a", "kind": "SFTJob", "job": "x", "stage": "sft"}, 10.0 * (i + 1)],
            ["dhad_job_total_steps", {"namespace": "a", "kind": "SFTJob", "job": "x", "stage": "sft"}, 40.0],
            ["dhad_jobs", {"kind": "SFTJob", "state": "Running"}, 2.0],
            ["dhad_jobs", {"kind": "EvalJob", "state": "Running"}, 1.0],
            ["c_total", {"kind": "SFTJob"}, 30.0 * i],
        ]
        for le, count in (("0.1", 10.0 * i), ("1.0", 20.0 * i), ("+Inf", 20.0 * i)):
            samples.append(["h_bucket", {"kind": "SFTJob", "le": le}, count])
        scrapes.append({"t": t, "samples": samples})
    path = tmp_path / "rec.json"
    path.write_text(json.dumps({"scrapes": scrapes}))
    return path


def last(expr: str, path: Path) -> dict:
    return {tuple(sorted(labels)): points[-1][1] for labels, points in png.series(expr, png.Recording.load(path)).items()}


def test_the_subset_answers_as_prometheus_does(tmp_path):
    path = recording(tmp_path)
    assert last("sum by (state) (dhad_jobs)", path) == {(("state", "Running"),): 3.0}
    assert last('100 * dhad_job_step{job=~"$job"} / dhad_job_total_steps', path) == {
        (("job", "x"), ("kind", "SFTJob"), ("namespace", "a"), ("stage", "sft")): 75.0}
    assert last("rate(c_total[5m])", path) == {(("kind", "SFTJob"),): 0.5}  # 60 over 120 s
    # 20 observations in 2 min, half below 0.1 s: the p95 interpolates inside (0.1, 1.0]
    p95 = last("histogram_quantile(0.95, sum by (le, kind) (rate(h_bucket[5m])))", path)
    assert p95 == {(("kind", "SFTJob"),): pytest.approx(0.1 + 0.9 * (0.95 * 20 - 10) / 10)}
    assert last('dhad_job_step{stage!="sft"}', path) == {}
    assert last("time() - dhad_job_total_steps", path) == {
        (("job", "x"), ("kind", "SFTJob"), ("namespace", "a"), ("stage", "sft")): 80.0}


def test_the_recorded_kwok_run_fills_every_panel(tmp_path):
    drawn = png.render(RECORDING, tmp_path / "dashboard.png")
    board = json.loads(png.DASHBOARD.read_text())
    assert set(drawn) == {p["title"] for p in board["panels"]}
    assert all(count >= 1 for count in drawn.values()), drawn
    assert (tmp_path / "dashboard.png").stat().st_size > 20_000
