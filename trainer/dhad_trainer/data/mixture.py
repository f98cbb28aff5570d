"""The training order of a prepared dataset: sources mixed by weight, shuffled so it can be streamed.

Each source contributes `mixture_blocks` blocks per epoch: every block floor(weight) times, plus a
random share (weight - floor(weight)) of its blocks, drawn with the training seed. The order is
shuffled in two levels, the way streaming loaders do it: the shard visits in random order, then the
blocks within each window of a few consecutive visits, so a rank reading its contiguous part of the
order touches a few shards at a time, each once, and never needs the whole dataset.
"""

from __future__ import annotations

import numpy as np

WINDOW = 4  # shard visits whose blocks are shuffled together


def shard_list(manifest: dict) -> list[tuple[str, int]]:
    """(path, blocks) of every shard, sources in manifest order: the shard numbering of `order`."""
    return [(path, blocks) for src in manifest["sources"] for path, blocks in src["shards"]]


def order(manifest: dict, seed: int, window: int = WINDOW) -> np.ndarray:
    """(positions, 2) int64 array of (shard number, row): one epoch of the mixture."""
    visits: list[np.ndarray] = []
    first = 0
    for s, src in enumerate(manifest["sources"]):
        sizes = np.array([b for _, b in src["shards"]], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        blocks = int(starts[-1])
        shard_ids = np.arange(first, first + len(sizes))
        first += len(sizes)
        if not blocks:
            continue
        whole = int(src["weight"] // 1)
        for _ in range(whole):
            visits += [np.stack([np.full(n, sid), np.arange(n)], axis=1) for sid, n in zip(shard_ids, sizes, strict=True) if n]
        extra = src["mixture_blocks"] - whole * blocks
        if extra > 0:
            rng = np.random.default_rng([seed, s])
            picked = np.sort(rng.choice(blocks, size=extra, replace=False))
            shard = np.searchsorted(starts, picked, side="right") - 1
            for sid in np.unique(shard):
                rows = picked[shard == sid] - starts[sid]
                visits.append(np.stack([np.full(len(rows), shard_ids[sid]), rows], axis=1))
    if not visits:
        return np.empty((0, 2), dtype=np.int64)
    rng = np.random.default_rng(seed)
    visits = [visits[i] for i in rng.permutation(len(visits))]
    out = []
    for w in range(0, len(visits), window):
        chunk = np.concatenate(visits[w : w + window])
        out.append(chunk[rng.permutation(len(chunk))])
    return np.concatenate(out).astype(np.int64)


def lane_length(total: int, world: int, micro_batch: int, accumulation: int = 1) -> int:
    """Blocks in each lane per epoch: whole micro batches, the same for every lane, so an epoch is
    whole optimizer steps (of world x accumulation micro batches)."""
    return (total // (world * accumulation * micro_batch)) * micro_batch


def rank_position(index: int, world: int, micro_batch: int, accumulation: int, lane: int) -> int:
    """Where dataset index `index` lies in the order.

    An epoch is split into world x accumulation lanes of `lane` consecutive positions; optimizer step s
    trains micro batch s of every lane, so which blocks a step trains depends on the micro batch and
    the global batch only: two processes train the same blocks per step as one process accumulating
    two micro batches. Rank r owns lanes [r * accumulation, (r + 1) * accumulation), a contiguous share
    of the order. The trainer deals batches round-robin (global batch b of `micro_batch` indices goes
    to rank b % world; a rank's k-th batch is accumulation slot k % accumulation of step k // accumulation)."""
    batch, j = divmod(index, micro_batch)
    step, slot = divmod(batch // world, accumulation)
    return ((batch % world) * accumulation + slot) * lane + step * micro_batch + j
