"""Exact and near-duplicate detection over matching-key words (see normalize.match_words).

Duplicates inflate some texts' weight and leak memorization; the first copy seen is kept. Both indexes
live in memory: 16 bytes per document for exact, one MinHash band signature set per document for near.
"""

from __future__ import annotations

import hashlib

import numpy as np
from datasketch import MinHash, MinHashLSH

from dhad_api.data_prep import DedupSpec, ShingleUnit


class ExactDeduper:
    """Remembers a 128-bit BLAKE2b digest of each document's matching key."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def is_duplicate(self, words: list[str]) -> bool:
        """True if these words were seen before; otherwise remembers them and returns False."""
        digest = hashlib.blake2b(" ".join(words).encode("utf-8"), digest_size=16).digest()
        if digest in self._seen:
            return True
        self._seen.add(digest)
        return False

    def __len__(self) -> int:
        return len(self._seen)


def shingles(words: list[str], unit: ShingleUnit, size: int) -> set[bytes]:
    """Word or character shingles of the matching key; a text shorter than one shingle is one shingle."""
    if unit is ShingleUnit.WORDS:
        seq: list[str] | str = words
        joiner = " "
    else:
        seq = " ".join(words)
        joiner = ""
    if len(seq) <= size:
        return {joiner.join(seq).encode("utf-8")} if seq else set()
    return {joiner.join(seq[i : i + size]).encode("utf-8") for i in range(len(seq) - size + 1)}


class NearDeduper:
    """MinHash + LSH: a document is a near duplicate if any kept document reaches `threshold` Jaccard.

    LSH only proposes candidates; each candidate's MinHash Jaccard estimate is checked against the
    threshold, which removes most of the banding's false positives.
    """

    def __init__(self, spec: DedupSpec | None = None, seed: int = 1) -> None:
        self.spec = spec or DedupSpec()
        self._lsh = MinHashLSH(threshold=self.spec.threshold, num_perm=self.spec.num_perm)
        self._template = MinHash(num_perm=self.spec.num_perm, seed=seed)
        self._kept: list[np.ndarray] = []  # hash values only: ~4 bytes per permutation per document

    def minhash(self, words: list[str]) -> MinHash:
        m = self._template.copy()
        m.update_batch(shingles(words, self.spec.shingle_unit, self.spec.shingle_size))
        return m

    def is_duplicate(self, words: list[str]) -> bool:
        """True if near an earlier kept document; otherwise indexes this one and returns False."""
        m = self.minhash(words)
        for key in self._lsh.query(m):
            if float(np.mean(self._kept[key] == m.hashvalues)) >= self.spec.threshold:
                return True
        self._lsh.insert(len(self._kept), m, check_duplication=False)
        self._kept.append(m.hashvalues)
        return False

    def __len__(self) -> int:
        return len(self._kept)
