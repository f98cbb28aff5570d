"""Evaluation report: results.json (every figure with its metric, method, n, 95% interval and chance
level), summary.md, PNG charts, and per-item predictions, all in one local folder the job uploads as is.

What keeps it from misleading:
- headline keys are "<suite>/<method>" ("<model>:<suite>/<method>" for the models compared with the
  job's own): a generation score, a log-likelihood score and a judged figure are different numbers;
- every score has its n and interval; every chart draws the chance (or parity) level;
- judged figures show the judge's forced, unparseable and position-inconsistent verdicts beside them,
  and a figure flagged for those (metrics.flag) is kept out of the headline scores;
- the sample (rule, seed, ids) and the scoring judge's prompt are written down.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dhad_trainer.evaluation.duplicates import DuplicateReport  # noqa: E402
from dhad_trainer.evaluation.scoring import METHODS, SCORES, SuiteResult  # noqa: E402

COLORS = ("#2a7f62", "#c77c1e", "#3b5ba5", "#a53b57", "#6b6b6b", "#7a4fa0", "#2f8fa8", "#9a8a2a")
METRIC_NAMES = {
    "accuracy": "accuracy",
    "category_mean": "mean of the 4 category accuracies",
    "macro_f1": "macro-F1 (yes/no)",
    "score_ratio": "ratio of summed 1-10 scores to the reference's (AceGPT)",
    "win_tie_score": "(wins + ties/2) / pairs vs the reference",
}


def _key(model: str | None, r: SuiteResult) -> str:
    return f"{model}:{r.suite}/{r.method}" if model else f"{r.suite}/{r.method}"


def headline_scores(results: Sequence[SuiteResult], model: str | None = None) -> dict[str, float]:
    """ "<suite>/<method>" -> headline score, leaving out figures without one and flagged figures."""
    return {_key(model, r): round(r.headline, 4) for r in results if r.headline is not None and not r.flag}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def _fmt(x: object) -> str:
    return f"{x:.4f}" if isinstance(x, float) else ("-" if x is None else str(x))


def _cell(r: SuiteResult | None) -> str:
    if r is None:
        return "-"
    m = r.metrics
    if r.headline is None:
        return f"- (n={m.get('n')})"
    ci = m.get("ci95")
    text = f"{r.headline:.4f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "") + f" n={m.get('n')}"
    return f"~~{text}~~ flagged" if r.flag else text


def _verdicts(r: SuiteResult) -> str:
    m = r.metrics
    asked = m.get("verdicts", m.get("judgements", 0))
    return f"forced {m.get('forced', 0)}/{asked}, unparseable {m.get('unparseable', 0)}/{asked}, " \
           f"position-inconsistent {m.get('inconsistent', 0)}"


def _rows(by_model: Mapping[str, Sequence[SuiteResult]]) -> list[tuple[str, str]]:
    return list(dict.fromkeys((r.suite, r.method) for rs in by_model.values() for r in rs))


def _find(rs: Sequence[SuiteResult], suite: str, method: str) -> SuiteResult | None:
    return next((r for r in rs if r.suite == suite and r.method == method), None)


def _markdown(by_model: Mapping[str, Sequence[SuiteResult]], dups: Mapping[str, DuplicateReport],
              samples: Mapping[str, dict], settings: Mapping, backends: Mapping[str, str]) -> str:
    names = list(by_model)
    lines = [
        f"# Arabic evaluation: {', '.join(names)}",
        "",
        "Scores from `generate` (AceGPT prompts, parsed answers), `loglikelihood` (choice log-probabilities) "
        "and the judged open-ended figures are different measurements and are not comparable with each "
        "other. Each cell: score [95% interval] n. A struck-out score is flagged (see Judge verdicts) and "
        "is not a headline result.",
        "",
        "| suite | method | metric | chance | " + " | ".join(names) + " |",
        "|---|---|---|---|" + "---|" * len(names),
    ]
    for suite, method in _rows(by_model):
        cells = [_find(by_model[n], suite, method) for n in names]
        first = next(c for c in cells if c is not None)
        metric = first.metrics.get("headline_metric")
        chance = first.metrics.get("chance")
        chance_text = f"{chance:.3f}" + (" (parity)" if "parity" in str(first.metrics.get("chance_rule")) else "") \
            if isinstance(chance, float) else "-"
        lines.append(f"| {suite} | {method} | {METRIC_NAMES.get(metric, metric)} | {chance_text} | "
                     + " | ".join(_cell(c) for c in cells) + " |")
    if any(r.metrics_dedup for rs in by_model.values() for r in rs):
        lines += ["", "## Without duplicate questions", "",
                  "| suite | method | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for suite, method in _rows(by_model):
            cells = []
            for n in names:
                r = _find(by_model[n], suite, method)
                d = (r.metrics_dedup or {}) if r else {}
                ci = d.get("ci95")
                cells.append(_fmt(d.get("headline")) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
                             + (f" n={d.get('n')}" if d else ""))
            lines.append(f"| {suite} | {method} | " + " | ".join(cells) + " |")
    judged = [(n, r) for n in names for r in by_model[n] if "flag" in r.metrics]
    if judged:
        lines += ["", "## Judge verdicts", "",
                  "A figure is flagged when more than half of its verdicts are forced (a local judge's "
                  "likelihood fallback) or unparseable, or more than half of its pairs are position-"
                  "inconsistent (each order preferred a different answer).", "",
                  "| model | suite | method | score | verdicts | flag |", "|---|---|---|---|---|---|"]
        for n, r in judged:
            lines.append(f"| {n} | {r.suite} | {r.method} | {_fmt(r.headline)} | {_verdicts(r)} | "
                         f"{r.flag or 'ok'} |")
    for n in names:
        lines += _details(n, by_model[n], len(names) > 1)
    if any(r.method == SCORES for rs in by_model.values() for r in rs):
        prompt = next(r.metrics["prompt"] for rs in by_model.values() for r in rs if r.method == SCORES
                      and "prompt" in r.metrics)
        lines += ["", "## The scoring judge's prompt (judge-scores)", "",
                  "Asked once with the model's answer as assistant 1 and once as assistant 2, per run.", "",
                  "```", prompt, "```"]
    lines += ["", "## Samples", ""]
    for suite, s in samples.items():
        lines.append(f"- {suite}: {s['drawn']} of {s['population']} items ({s['rule']}; seed {s['seed']}; "
                     f"subjects covered {s['subjects_covered']})")
    for suite, s in samples.items():
        if s["limit"] is not None:
            lines += ["", f"<details><summary>{suite}: the {s['drawn']} item ids used</summary>", "",
                      ", ".join(s["ids"]), "", "</details>"]
    lines += ["", "## Settings", "", "- generation backends: "
              + ", ".join(f"{n}: {b}" for n, b in backends.items()) if backends else "",
              *[f"- {k}: {v}" for k, v in settings.items()]]
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


def _details(name: str, results: Sequence[SuiteResult], several: bool) -> list[str]:
    lines: list[str] = []
    title = f" ({name})" if several else ""
    for r in results:
        m = r.metrics
        if m.get("unparsed"):
            reasons = ", ".join(f"{k} {v}" for k, v in m.get("unparsed_reasons", {}).items())
            lines += ["", f"- {r.suite} {r.method}{title}: {m['unparsed']} of {m['n']} answers unparseable ({reasons})"]
        if "per_category" in m:
            lines += ["", f"## Arabic-MMLU per category ({r.method}){title}", "",
                      "| category | accuracy | 95% interval | n |", "|---|---|---|---|"]
            for c, v in m["per_category"].items():
                ci = v.get("ci95") or [0.0, 0.0]
                lines.append(f"| {c} | {v['accuracy']:.4f} | [{ci[0]:.3f}, {ci[1]:.3f}] | {v['n']} |")
            lines.append(f"| micro (all questions) | {m['micro_accuracy']:.4f} | - | {m['n']} |")
        if "wins" in m:
            lines += ["", f"## {r.suite} vs reference, pairwise{title}", "",
                      f"wins {m['wins']}, ties {m['ties']}, losses {m['losses']}, invalid {m['invalid']}; "
                      f"score {m['score']:.4f}; ratio to reference {_fmt(m['ratio_to_reference'])}"]
        if "score_ratio" in m:
            per_run = ", ".join(_fmt(x) for x in m["ratio_per_run"])
            lines += ["", f"## {r.suite} vs reference, AceGPT's score ratio{title}", "",
                      f"ratio {_fmt(m['score_ratio'])} (per run: {per_run}; std {_fmt(m['ratio_std'])}); "
                      f"mean score model {_fmt(m['model_mean_score'])}, reference {_fmt(m['reference_mean_score'])}; "
                      f"{m['valid_judgements']} of {m['judgements']} judgements parsed"]
    return lines


def _grouped(ax, groups: list[str], series: Mapping[str, list[tuple[float | None, list | None, bool]]],
             chance: list[float | None], horizontal: bool = False) -> None:
    """Bars per group, one per model, with interval whiskers, flagged bars hatched and each group's
    chance level as a black dashed segment."""
    n = max(len(series), 1)
    width = 0.8 / n
    for k, (name, values) in enumerate(series.items()):
        labelled = False
        for g, (value, ci, flagged) in enumerate(values):
            if value is None:
                continue
            at = g - 0.4 + width * (k + 0.5)
            err = None
            if ci:
                err = [[max(value - ci[0], 0)], [max(ci[1] - value, 0)]]
            style = dict(color=COLORS[k % len(COLORS)], hatch="//" if flagged else None,
                         alpha=0.45 if flagged else 1.0, label=None if labelled else name)
            labelled = True
            if horizontal:
                ax.barh(at, value, height=width, xerr=err, **style)
            else:
                ax.bar(at, value, width=width, yerr=err, **style)
    for g, level in enumerate(chance):
        if level is None:
            continue
        if horizontal:
            ax.plot([level, level], [g - 0.45, g + 0.45], "k--", linewidth=1)
        else:
            ax.plot([g - 0.45, g + 0.45], [level, level], "k--", linewidth=1)
    ticks = list(range(len(groups)))
    if horizontal:
        ax.set_yticks(ticks, groups, fontsize=7)
        ax.invert_yaxis()
    else:
        ax.set_xticks(ticks, groups, rotation=30, fontsize=8, ha="right")
    ax.plot([], [], "k--", linewidth=1, label="chance / parity")
    ax.legend(fontsize=7, loc="best")


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _series(by_model, pick) -> tuple[list[str], dict, list]:
    groups = list(dict.fromkeys(k for rs in by_model.values() for r in rs for k, _ in pick(r)))
    series: dict[str, list] = {}
    chance: dict[str, float | None] = {}
    for name, rs in by_model.items():
        found = {k: v for r in rs for k, v in pick(r)}
        series[name] = [found.get(g, (None, None, False, None))[:3] for g in groups]
        for g in groups:
            if g in found and found[g][3] is not None:
                chance[g] = found[g][3]
    return groups, series, [chance.get(g) for g in groups]


def _charts(by_model: Mapping[str, Sequence[SuiteResult]], out: Path) -> list[str]:
    written = []

    def unit_scale(r: SuiteResult):
        if r.headline is not None and r.method != SCORES:
            m = r.metrics
            yield f"{r.suite}\n{r.method}", (r.headline, m.get("ci95"), bool(r.flag), m.get("chance"))

    groups, series, chance = _series(by_model, unit_scale)
    if groups:
        fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(groups) * max(1, len(series)) ** 0.5), 4.5))
        _grouped(ax, groups, series, chance)
        ax.set_ylim(0, 1)
        ax.set_title("Headline score per suite and method (95% interval; hatched = flagged)")
        _save(fig, out / "scores.png")
        written.append("scores.png")

    def ratio(r: SuiteResult):
        if r.method == SCORES and r.headline is not None:
            yield r.suite, (r.headline, r.metrics.get("ci95"), bool(r.flag), 1.0)

    groups, series, chance = _series(by_model, ratio)
    if groups:
        fig, ax = plt.subplots(figsize=(6, 4))
        _grouped(ax, groups, series, chance)
        ax.set_ylim(0, max(1.5, *(v[0] for s in series.values() for v in s if v[0] is not None)) * 1.1)
        ax.set_title("AceGPT score ratio to the reference (parity = 1)")
        _save(fig, out / "open_ended_ratio.png")
        written.append("open_ended_ratio.png")
    for method in dict.fromkeys(r.method for rs in by_model.values() for r in rs):

        def topics(r: SuiteResult, method=method):
            if r.method == method and "per_topic" in r.metrics:
                for t, v in r.metrics["per_topic"].items():
                    yield t, (v["macro_f1"], None, False, v.get("chance"))

        groups, series, chance = _series(by_model, topics)
        if groups:
            fig, ax = plt.subplots(figsize=(8, max(3.0, 0.16 * len(groups) * len(series) + 1)))
            _grouped(ax, groups, series, chance, horizontal=True)
            ax.set_xlim(0, 1)
            ax.set_title(f"ACVA macro-F1 per topic ({method}); dashed: a uniform guess")
            _save(fig, out / f"acva_topics_{method}.png")
            written.append(f"acva_topics_{method}.png")

        def categories(r: SuiteResult, method=method):
            if r.method == method and "per_category" in r.metrics:
                for c, v in r.metrics["per_category"].items():
                    yield c, (v["accuracy"], v.get("ci95"), False, 0.25)

        groups, series, chance = _series(by_model, categories)
        if groups:
            fig, ax = plt.subplots(figsize=(max(5.0, 1.5 * len(groups)), 4))
            _grouped(ax, groups, series, chance)
            ax.set_ylim(0, 1)
            ax.set_title(f"Arabic-MMLU accuracy per category ({method})")
            _save(fig, out / f"mmlu_categories_{method}.png")
            written.append(f"mmlu_categories_{method}.png")
    return written


def _entry(r: SuiteResult) -> dict:
    return {
        "suite": r.suite,
        "method": r.method,
        "k_shot": r.k_shot,
        "notes": r.notes,
        "elapsed_s": round(r.elapsed_s, 3),
        "items_per_s": round(r.items_per_s, 3),
        "flag": r.flag,
        "metrics": r.metrics,
        "metrics_without_duplicates": r.metrics_dedup,
    }


def write_report(
    results: Sequence[SuiteResult] | Mapping[str, Sequence[SuiteResult]],
    out_dir: str | Path,
    *,
    model: str = "model",
    duplicates: Mapping[str, DuplicateReport] | None = None,
    samples: Mapping[str, dict] | None = None,
    settings: Mapping | None = None,
    backends: Mapping[str, str] | None = None,
    predictions: bool = True,
) -> dict[str, float]:
    """Write the report files to `out_dir` and return the headline scores for the job status: the first
    model's as "<suite>/<method>", the others' as "<model>:<suite>/<method>"."""
    by_model = dict(results) if isinstance(results, Mapping) else {model: list(results)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dups = dict(duplicates or {})
    names = list(by_model)
    headline: dict[str, float] = {}
    for k, name in enumerate(names):
        headline.update(headline_scores(by_model[name], None if k == 0 else name))
    flagged = {_key(None if k == 0 else n, r): r.flag for k, n in enumerate(names) for r in by_model[n] if r.flag}
    charts = _charts(by_model, out)
    all_methods = dict.fromkeys(r.method for rs in by_model.values() for r in rs)
    doc = {
        "model": names[0],
        "models": names,
        "headline": headline,
        "flagged": flagged,
        "methods": {m: METHODS[m] for m in all_methods if m in METHODS},
        "settings": dict(settings or {}),
        "backends": dict(backends or {}),
        "samples": dict(samples or {}),
        "charts": charts,
        "suites": [_entry(r) for r in by_model[names[0]]],
        "compared": {n: [_entry(r) for r in by_model[n]] for n in names[1:]},
        "duplicates": {s: rep.summary() for s, rep in dups.items()},
    }
    (out / "results.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1), encoding="utf-8")
    (out / "summary.md").write_text(
        _markdown(by_model, dups, samples or {}, settings or {}, backends or {}), encoding="utf-8"
    )
    if predictions:
        for k, name in enumerate(names):
            prefix = "" if k == 0 else f"{_slug(name)}_"
            for r in by_model[name]:
                path = out / f"predictions_{prefix}{r.suite}_{r.method.replace('+', '_')}.jsonl"
                with path.open("w", encoding="utf-8") as fh:
                    for item in r.items:
                        row = {"model": name, "method": r.method, **asdict(item)}
                        fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return headline
