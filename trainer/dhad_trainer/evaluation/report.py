"""Evaluation report: results.json (every figure with the method that produced it), summary.md, PNG
charts, and per-item predictions, all in one local folder the job uploads as it is.

Headline keys are "<suite>/<method>": a generation score and a log-likelihood score of the same suite
are different numbers and must never be read as one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dhad_trainer.evaluation.duplicates import DuplicateReport  # noqa: E402
from dhad_trainer.evaluation.scoring import METHODS, SuiteResult  # noqa: E402


def headline_scores(results: Sequence[SuiteResult]) -> dict[str, float]:
    """ "<suite>/<method>" -> headline score (open-ended suites without a judge have none)."""
    return {f"{r.suite}/{r.method}": round(r.headline, 4) for r in results if r.headline is not None}


def _fmt(x: object) -> str:
    return f"{x:.4f}" if isinstance(x, float) else ("-" if x is None else str(x))


def _markdown(results: Sequence[SuiteResult], dups: Mapping[str, DuplicateReport], model: str) -> str:
    lines = [
        f"# Arabic evaluation: {model}",
        "",
        "Scores from `generate` (AceGPT prompts, parsed answers) and `loglikelihood` (choice "
        "log-probabilities) are not comparable with each other.",
        "",
        "| suite | method | k-shot | metric | score | without duplicates | n | unparsed | items/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m, d = r.metrics, r.metrics_dedup or {}
        lines.append(
            f"| {r.suite} | {r.method} | {r.k_shot} | {m.get('headline_metric')} | {_fmt(r.headline)} | "
            f"{_fmt(d.get('headline'))} | {m.get('n')} | {_fmt(m.get('unparsed', m.get('invalid')))} | "
            f"{r.items_per_s:.1f} |"
        )
    for r in results:
        if "per_category" in r.metrics:
            lines += [
                "",
                f"## Arabic-MMLU per category ({r.method})",
                "",
                "| category | accuracy | n |",
                "|---|---|---|",
            ]
            lines += [
                f"| {c} | {v['accuracy']:.4f} | {v['n']} |" for c, v in r.metrics["per_category"].items()
            ]
            lines.append(f"| micro (all questions) | {r.metrics['micro_accuracy']:.4f} | {r.metrics['n']} |")
        if "wins" in r.metrics:
            m = r.metrics
            lines += [
                "",
                f"## {r.suite} vs reference",
                "",
                f"wins {m['wins']}, ties {m['ties']}, losses {m['losses']}, invalid {m['invalid']}; "
                f"score {m['score']:.4f}; ratio to reference {_fmt(m['ratio_to_reference'])}",
            ]
    if dups:
        lines += [
            "",
            "## Duplicate questions",
            "",
            next(iter(dups.values())).rule,
            "",
            "| suite | items | exact groups | items in exact groups | largest exact group "
            "| groups (with near) | items in groups | groups with conflicting answers |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for suite, rep in dups.items():
            s = rep.summary(0)
            lines.append(
                f"| {suite} | {s['n_items']} | {s['exact_groups']} | {s['items_in_exact_groups']} | "
                f"{s['largest_exact_group']} | {s['groups']} | {s['items_in_groups']} | "
                f"{s['groups_with_conflicting_answers']} |"
            )
    return "\n".join(lines) + "\n"


def _bar(path: Path, labels: list[str], values: list[float], title: str, horizontal: bool = False) -> None:
    fig, ax = plt.subplots(
        figsize=(8, max(3.0, 0.22 * len(labels))) if horizontal else (max(5.0, 0.9 * len(labels)), 4)
    )
    (ax.barh if horizontal else ax.bar)(labels, values, color="#2a7f62")
    (ax.set_xlim if horizontal else ax.set_ylim)(0, 1)
    if horizontal:
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
    else:
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _charts(results: Sequence[SuiteResult], out: Path) -> list[str]:
    written = []
    scored = [(f"{r.suite}\n{r.method}", r.headline) for r in results if r.headline is not None]
    if scored:
        _bar(
            out / "scores.png",
            [label for label, _ in scored],
            [value for _, value in scored],
            "Headline score per suite and method",
        )
        written.append("scores.png")
    for r in results:
        if "per_topic" in r.metrics:
            name = f"acva_topics_{r.method}.png"
            topics = r.metrics["per_topic"]
            _bar(
                out / name,
                list(topics),
                [v["macro_f1"] for v in topics.values()],
                f"ACVA macro-F1 per topic ({r.method})",
                horizontal=True,
            )
            written.append(name)
        if "per_category" in r.metrics:
            name = f"mmlu_categories_{r.method}.png"
            cats = r.metrics["per_category"]
            _bar(
                out / name,
                list(cats),
                [v["accuracy"] for v in cats.values()],
                f"Arabic-MMLU accuracy per category ({r.method})",
            )
            written.append(name)
    return written


def write_report(
    results: Sequence[SuiteResult],
    out_dir: str | Path,
    *,
    model: str = "model",
    duplicates: Mapping[str, DuplicateReport] | None = None,
    predictions: bool = True,
) -> dict[str, float]:
    """Write the report files to `out_dir` and return the headline scores for the job status."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dups = dict(duplicates or {})
    headline = headline_scores(results)
    charts = _charts(results, out)
    doc = {
        "model": model,
        "headline": headline,
        "methods": {m: METHODS[m] for m in dict.fromkeys(r.method for r in results)},
        "charts": charts,
        "suites": [
            {
                "suite": r.suite,
                "method": r.method,
                "k_shot": r.k_shot,
                "notes": r.notes,
                "elapsed_s": round(r.elapsed_s, 3),
                "items_per_s": round(r.items_per_s, 3),
                "metrics": r.metrics,
                "metrics_without_duplicates": r.metrics_dedup,
            }
            for r in results
        ],
        "duplicates": {s: rep.summary() for s, rep in dups.items()},
    }
    (out / "results.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1), encoding="utf-8")
    (out / "summary.md").write_text(_markdown(results, dups, model), encoding="utf-8")
    if predictions:
        for r in results:
            with (out / f"predictions_{r.suite}_{r.method.replace('+', '_')}.jsonl").open(
                "w", encoding="utf-8"
            ) as fh:
                for item in r.items:
                    fh.write(json.dumps({"method": r.method, **asdict(item)}, ensure_ascii=False) + "\n")
    return headline
