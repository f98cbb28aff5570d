"""Renders charts/dhad/dashboards/dhad-jobs.json to a PNG from recorded scrapes of the operator, with
matplotlib, so docs/ shows what the Grafana dashboard shows without a Grafana or a Prometheus here.

    .venv/bin/python hack/dashboard_png.py docs/assets/recorded-metrics.json docs/assets/dashboard.png

The recording is what tests/integration/test_operator_job_metrics.py scraped from the operator's
/metrics during a running job on kwok (DHAD_RECORD_METRICS=path writes it). Each panel's PromQL is
evaluated by a small evaluator of the subset the dashboard uses: selectors with =, !=, =~, !~
matchers, `[range]`, rate(), time(), sum/max by (...), histogram_quantile() and + - * / between a
scalar and a vector or two vectors with the same labels. Dashboard variables match everything.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "charts" / "dhad" / "dashboards" / "dhad-jobs.json"
TOKEN = re.compile(r"\s*(?:(?P<num>\d+(?:\.\d+)?(?:e[+-]?\d+)?)|(?P<str>\"(?:[^\"\\]|\\.)*\")|(?P<range>\[\d+[smhd]\])"
                   r"|(?P<op>=~|!~|!=|==|>=|<=|[-+*/(){},=<>])|(?P<name>[A-Za-z_:][A-Za-z0-9_:]*))")
SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

Labels = frozenset  # of (name, value) pairs
Vector = dict  # Labels -> float


@dataclass
class Recording:
    """Scrapes in time order: (unix time, {(metric name, labels): value})."""

    scrapes: list[tuple[float, dict[tuple[str, Labels], float]]]

    @classmethod
    def load(cls, path: Path) -> Recording:
        doc = json.loads(Path(path).read_text())
        scrapes = [(s["t"], {(name, Labels(labels.items())): value for name, labels, value in s["samples"]})
                   for s in doc["scrapes"]]
        return cls(sorted(scrapes, key=lambda s: s[0]))

    def at(self, t: float) -> dict:
        latest = [s for s in self.scrapes if s[0] <= t]
        return latest[-1][1] if latest else {}

    def window(self, t: float, seconds: float) -> list[tuple[float, dict]]:
        return [s for s in self.scrapes if t - seconds < s[0] <= t]


def tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr.rstrip()):
        match = TOKEN.match(expr, pos)
        if not match:
            raise ValueError(f"cannot read {expr[pos:]!r} in {expr!r}")
        kind = match.lastgroup
        out.append((kind, match.group(kind)))
        pos = match.end()
    return out


class Parser:
    """Precedence climbing over + - (low), * / (high); atoms are numbers, calls, aggregations, selectors."""

    def __init__(self, expr: str) -> None:
        self.toks, self.i = tokens(expr), 0

    def peek(self, value: str | None = None) -> bool:
        return self.i < len(self.toks) and (value is None or self.toks[self.i][1] == value)

    def take(self, value: str | None = None) -> str:
        kind, text = self.toks[self.i]
        if value is not None and text != value:
            raise ValueError(f"expected {value!r}, got {text!r}")
        self.i += 1
        return text

    def parse(self):
        node = self.sum_()
        if self.peek():
            raise ValueError(f"unexpected {self.toks[self.i][1]!r}")
        return node

    def sum_(self):
        node = self.product()
        while self.peek("+") or self.peek("-"):
            node = ("bin", self.take(), node, self.product())
        return node

    def product(self):
        node = self.atom()
        while self.peek("*") or self.peek("/"):
            node = ("bin", self.take(), node, self.atom())
        return node

    def labels_list(self) -> list[str]:
        self.take("(")
        names = []
        while not self.peek(")"):
            names.append(self.take())
            if self.peek(","):
                self.take(",")
        self.take(")")
        return names

    def atom(self):
        kind, text = self.toks[self.i]
        if kind == "num":
            self.i += 1
            return ("num", float(text))
        if text == "(":
            self.take("(")
            node = self.sum_()
            self.take(")")
            return node
        name = self.take()
        if name in ("sum", "max"):
            by = self.labels_list() if self.peek("by") and self.take("by") else []
            self.take("(")
            inner = self.sum_()
            self.take(")")
            return ("agg", name, by, inner)
        if name in ("rate", "histogram_quantile", "time"):
            self.take("(")
            args = []
            while not self.peek(")"):
                args.append(self.sum_())
                if self.peek(","):
                    self.take(",")
            self.take(")")
            return ("call", name, args)
        matchers = []
        if self.peek("{"):
            self.take("{")
            while not self.peek("}"):
                label, op, value = self.take(), self.take(), json.loads(self.take())
                matchers.append((label, op, value))
                if self.peek(","):
                    self.take(",")
            self.take("}")
        window = None
        if self.i < len(self.toks) and self.toks[self.i][0] == "range":
            text = self.take()
            window = int(text[1:-2]) * SECONDS[text[-2]]
        return ("sel", name, matchers, window)


def _matches(labels: Labels, matchers) -> bool:
    values = dict(labels)
    for label, op, pattern in matchers:
        value = values.get(label, "")
        ok = {"=": value == pattern, "!=": value != pattern,
              "=~": re.fullmatch(pattern, value) is not None, "!~": re.fullmatch(pattern, value) is None}[op]
        if not ok:
            return False
    return True


def _select(samples: dict, name: str, matchers) -> Vector:
    return {labels: value for (metric, labels), value in samples.items() if metric == name and _matches(labels, matchers)}


def evaluate(node, rec: Recording, t: float):
    """A float (scalar) or a Vector at time t."""
    kind = node[0]
    if kind == "num":
        return node[1]
    if kind == "sel":
        _, name, matchers, window = node
        if window is None:
            return _select(rec.at(t), name, matchers)
        return ("range", [(ts, _select(s, name, matchers)) for ts, s in rec.window(t, window)])
    if kind == "call":
        _, name, args = node
        if name == "time":
            return t
        if name == "rate":
            _, points = evaluate(args[0], rec, t)
            out: Vector = {}
            for labels in {k for _, v in points for k in v}:
                series = [(ts, v[labels]) for ts, v in points if labels in v]
                if len(series) >= 2 and series[-1][0] > series[0][0]:
                    increase = sum(max(b - a, b if b < a else 0.0) for (_, a), (_, b) in zip(series, series[1:], strict=False))
                    out[labels] = increase / (series[-1][0] - series[0][0])
            return out
        if name == "histogram_quantile":
            q, vector = evaluate(args[0], rec, t), evaluate(args[1], rec, t)
            groups: dict[Labels, list[tuple[float, float]]] = {}
            for labels, value in vector.items():
                values = dict(labels)
                le = float(values.pop("le"))
                groups.setdefault(Labels(values.items()), []).append((le, value))
            return {labels: _quantile(q, sorted(buckets)) for labels, buckets in groups.items()
                    if not math.isnan(_quantile(q, sorted(buckets)))}
    if kind == "agg":
        _, how, by, inner = node
        vector = evaluate(inner, rec, t)
        out = {}
        for labels, value in vector.items():
            key = Labels((k, v) for k, v in labels if k in by)
            out[key] = value if key not in out else (out[key] + value if how == "sum" else max(out[key], value))
        return out
    if kind == "bin":
        _, op, left, right = node
        a, b = evaluate(left, rec, t), evaluate(right, rec, t)
        fn = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y,
              "/": lambda x, y: x / y if y else math.nan}[op]
        if isinstance(a, float) and isinstance(b, float):
            return fn(a, b)
        if isinstance(a, float):
            return {k: fn(a, v) for k, v in b.items()}
        if isinstance(b, float):
            return {k: fn(v, b) for k, v in a.items()}
        return {k: fn(v, b[k]) for k, v in a.items() if k in b}
    raise ValueError(f"cannot evaluate {node!r}")


def _quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' linear interpolation within the bucket holding the q-th observation."""
    if not buckets or buckets[-1][1] == 0:
        return math.nan
    rank, previous_le, previous_count = q * buckets[-1][1], 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return previous_le
            return previous_le + (le - previous_le) * (rank - previous_count) / max(count - previous_count, 1e-12)
        previous_le, previous_count = le, count
    return buckets[-1][0]


def series(expr: str, rec: Recording) -> dict[Labels, list[tuple[float, float]]]:
    """The panel's time series: the expression at every recorded scrape time."""
    node = Parser(re.sub(r"\$\w+", ".*", expr)).parse()
    out: dict[Labels, list[tuple[float, float]]] = {}
    for t, _ in rec.scrapes:
        value = evaluate(node, rec, t)
        for labels, v in ({Labels(): value} if isinstance(value, float) else value).items():
            if not math.isnan(v):
                out.setdefault(labels, []).append((t, v))
    return out


def legend(fmt: str, labels: Labels) -> str:
    values = dict(labels)
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: values.get(m.group(1), ""), fmt).strip() or "value"


def render(recording: Path, out: Path, dashboard: Path = DASHBOARD) -> dict[str, int]:
    """Draws every panel in the dashboard's grid; returns panel title -> number of series drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    board = json.loads(dashboard.read_text())
    rec = Recording.load(recording)
    start = rec.scrapes[0][0]
    panels = board["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig = plt.figure(figsize=(18, rows * 0.6), facecolor="#111217")
    grid = fig.add_gridspec(rows, 24, hspace=3.0, wspace=2.0, left=0.04, right=0.99)
    drawn: dict[str, int] = {}
    for panel in panels:
        g = panel["gridPos"]
        ax = fig.add_subplot(grid[g["y"]:g["y"] + g["h"], g["x"]:g["x"] + g["w"]])
        ax.set_facecolor("#181b1f")
        for spine in ax.spines.values():
            spine.set_color("#2c3235")
        ax.tick_params(colors="#ccccdc", labelsize=7)
        ax.set_title(panel["title"], color="#ccccdc", fontsize=10, loc="left")
        count = 0
        for target in panel["targets"]:
            for labels, points in sorted(series(target["expr"], rec).items(), key=lambda kv: sorted(kv[0])):
                xs = [(ts - start) / 60 for ts, _ in points]
                ax.plot(xs, [v for _, v in points], linewidth=1.6, label=legend(target.get("legendFormat", ""), labels))
                count += 1
        drawn[panel["title"]] = count
        ax.set_xlabel("minutes", color="#8e8e8e", fontsize=7)
        ax.grid(color="#2c3235", linewidth=0.5)
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        if unit and unit not in ("none", "short"):
            ax.set_ylabel(unit, color="#8e8e8e", fontsize=7)
        if count:
            ax.legend(fontsize=6, facecolor="#181b1f", edgecolor="#2c3235", labelcolor="#ccccdc", loc="best")
    fig.suptitle(f"{board['title']} (rendered from recorded operator scrapes by hack/dashboard_png.py)",
                 color="#ccccdc", fontsize=12, x=0.01, ha="left")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, facecolor=fig.get_facecolor(), bbox_inches="tight")
    plt.close(fig)
    return drawn


if __name__ == "__main__":
    print(json.dumps(render(Path(sys.argv[1]), Path(sys.argv[2])), indent=2))
