"""Duplicate and near-duplicate questions within one suite, so scores can be given with and without them.

Rule:
- exact: same question text after `fold` (tashkeel and tatweel removed, alef unified, case folded,
  whitespace collapsed).
- near: Jaccard similarity >= 0.8 between the sets of character 5-grams of two folded texts (a text
  shorter than 5 characters is its own single shingle). Computed exactly, not estimated: a prefix-filter
  similarity join (two sets with Jaccard >= t must share one of their rarest |s| - ceil(t|s|) + 1
  shingles) proposes candidates and each candidate is verified on the full sets. No MinHash, so there
  are no false positives or misses from sampling and the result is deterministic.
- groups: connected components of the exact and near links (so A~B and B~C put A, B, C together);
  a group is "near" when it joins at least two different folded texts, otherwise "exact".

Only the question is compared, not the choices: the known Arabic-MMLU corruption overwrote questions
(and paraphrased their choices) while keeping the labels, so the question text is where it shows.
Generic stems ("أي من العبارات التالية صحيحة؟") with different choices are reported too; they are few.

Exclusion when scoring (`exclude_ids`): "all" drops every member of every group (the default for the
deduplicated score: in a corrupted group no member can be trusted and the original cannot be told
apart), "keep_first" keeps the first member in file order (plain repeats), "none" drops nothing.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Literal

import numpy as np

from dhad_trainer.evaluation.arabic import fold
from dhad_trainer.evaluation.loaders import EvalItem

Policy = Literal["all", "keep_first", "none"]


@dataclass(frozen=True)
class DuplicateGroup:
    kind: Literal["exact", "near"]
    item_ids: tuple[str, ...]
    texts: int  # distinct folded texts in the group
    answers: int  # distinct gold answers: more than 1 means the copies cannot all be right
    example: str


@dataclass
class DuplicateReport:
    suite: str
    n_items: int
    groups: list[DuplicateGroup] = field(default_factory=list)
    threshold: float = 0.8
    ngram: int = 5
    # exact-only figures, kept apart because near links merge exact groups into bigger components
    exact_groups: int = 0
    exact_duplicate_items: int = 0
    largest_exact_group: int = 0

    @property
    def rule(self) -> str:
        return (
            f"exact: equal question after Arabic folding; near: character {self.ngram}-gram Jaccard >= "
            f"{self.threshold} (exact prefix-filter join); groups = connected components"
        )

    def exclude_ids(self, policy: Policy = "all") -> set[str]:
        if policy == "none":
            return set()
        skip = 1 if policy == "keep_first" else 0
        return {i for g in self.groups for i in g.item_ids[skip:]}

    def summary(self, top: int = 10) -> dict:
        kinds = Counter(g.kind for g in self.groups)
        in_exact = self.exact_duplicate_items
        return {
            "rule": self.rule,
            "n_items": self.n_items,
            "groups": len(self.groups),
            "items_in_groups": sum(len(g.item_ids) for g in self.groups),
            "exact_groups": self.exact_groups,
            "items_in_exact_groups": in_exact,
            "exact_redundant": in_exact - self.exact_groups,
            "near_groups": kinds["near"],
            "items_in_near_groups": sum(len(g.item_ids) for g in self.groups if g.kind == "near"),
            "largest_exact_group": self.largest_exact_group,
            "groups_with_conflicting_answers": sum(g.answers > 1 for g in self.groups),
            "excluded_all": len(self.exclude_ids("all")),
            "excluded_keep_first": len(self.exclude_ids("keep_first")),
            "top_groups": [
                {
                    "kind": g.kind,
                    "size": len(g.item_ids),
                    "texts": g.texts,
                    "answers": g.answers,
                    "example": g.example,
                    "ids": list(g.item_ids[:20]),
                }
                for g in self.groups[:top]
            ],
        }


def shingles(text: str, n: int = 5) -> set[str]:
    return {text[i : i + n] for i in range(len(text) - n + 1)} if len(text) >= n else {text}


def near_pairs(texts: Sequence[str], threshold: float = 0.8, n: int = 5) -> list[tuple[int, int]]:
    """Index pairs (i < j) of texts whose shingle sets have Jaccard >= threshold, exactly."""
    sets = [shingles(t, n) for t in texts]
    vocab = {s: i for i, s in enumerate(dict.fromkeys(chain.from_iterable(sets)))}
    ids = [np.fromiter(map(vocab.__getitem__, st), np.int64, len(st)) for st in sets]
    df = np.bincount(np.concatenate(ids), minlength=len(vocab)) if ids else np.zeros(0, np.int64)
    rank = np.empty(len(vocab), np.int64)
    rank[np.argsort(df, kind="stable")] = np.arange(len(vocab))  # rarest shingles first
    index: dict[int, list[int]] = defaultdict(list)
    pairs = []
    for j in sorted(range(len(texts)), key=lambda k: len(sets[k])):  # shorter sets are indexed first
        size = len(sets[j])
        candidates: set[int] = set()
        for tok in np.sort(rank[ids[j]])[: size - math.ceil(threshold * size) + 1].tolist():
            candidates.update(index[tok])
            index[tok].append(j)
        for i in candidates:
            a, b = sets[i], sets[j]
            if len(a) < threshold * len(b):
                continue
            inter = len(a & b)
            if inter >= threshold * (len(a) + len(b) - inter):
                pairs.append((min(i, j), max(i, j)))
    return sorted(pairs)


def find_duplicates(items: Sequence[EvalItem], threshold: float = 0.8, ngram: int = 5) -> DuplicateReport:
    """Exact and near-duplicate questions of one suite's items, largest group first."""
    keys = [fold(it.question) for it in items]
    by_text: dict[str, list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        by_text[k].append(i)
    texts = list(by_text)
    parent = list(range(len(texts)))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in near_pairs(texts, threshold, ngram):
        parent[root(i)] = root(j)
    members: dict[int, list[int]] = defaultdict(list)
    for t in range(len(texts)):
        members[root(t)].append(t)
    groups = []
    for comp in members.values():
        idx = sorted(i for t in comp for i in by_text[texts[t]])
        if len(idx) > 1:
            groups.append(
                DuplicateGroup(
                    "near" if len(comp) > 1 else "exact",
                    tuple(items[i].id for i in idx),
                    len(comp),
                    len({items[i].answer for i in idx}),
                    items[idx[0]].question[:200],
                )
            )
    groups.sort(key=lambda g: (-len(g.item_ids), g.item_ids[0]))
    exact_sizes = [len(v) for v in by_text.values() if len(v) > 1]
    return DuplicateReport(
        items[0].suite if items else "",
        len(items),
        groups,
        threshold,
        ngram,
        exact_groups=len(exact_sizes),
        exact_duplicate_items=sum(exact_sizes),
        largest_exact_group=max(exact_sizes, default=0),
    )
