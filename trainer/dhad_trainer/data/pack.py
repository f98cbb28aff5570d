"""Batched tokenization and packing of documents into fixed-length training blocks.

Packing wastes no compute on padding. To keep documents from attending to each other inside a block,
every block carries `position_ids` that restart at 0 at each document start and at the block start (a
document cut by a block boundary continues from 0 in the next block), which is exactly what HF
flash-attention varlen reads its segment boundaries from, plus `seq_lens` (segment lengths).
The tail that does not fill a last block is dropped and counted, never padded.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from dhad_api.data_prep import PackingSpec


@dataclass
class Block:
    """One packed training sequence; len(input_ids) == len(position_ids) == sum(seq_lens)."""

    input_ids: list[int]
    position_ids: list[int]
    seq_lens: list[int] = field(default_factory=list)


class Packer:
    """Concatenates token id lists (each followed by EOS when `eos_id` is given) into blocks."""

    def __init__(self, sequence_length: int, eos_id: int | None = None) -> None:
        if sequence_length < 1:
            raise ValueError("sequence_length must be positive")
        self.length = sequence_length
        self.eos_id = eos_id
        self.tokens = 0  # all tokens fed in, EOS included
        self.blocks = 0
        self.documents = 0
        self._new_block()

    def _new_block(self) -> None:
        self._ids: list[int] = []
        self._pos: list[int] = []
        self._lens: list[int] = []

    def add(self, ids: list[int]) -> list[Block]:
        """Append one document's ids; returns the blocks this completes (often none)."""
        doc = list(ids) + ([self.eos_id] if self.eos_id is not None else [])
        done: list[Block] = []
        if not doc:
            return done
        self.documents += 1
        self.tokens += len(doc)
        off = 0
        while off < len(doc):
            take = doc[off : off + self.length - len(self._ids)]
            self._ids.extend(take)
            self._pos.extend(range(len(take)))
            self._lens.append(len(take))
            off += len(take)
            if len(self._ids) == self.length:
                self.blocks += 1
                done.append(Block(self._ids, self._pos, self._lens))
                self._new_block()
        return done

    @property
    def pending(self) -> int:
        """Tokens waiting in the unfinished block (dropped if the input ends now)."""
        return len(self._ids)

    def tail(self) -> tuple[list[int], list[int]]:
        """The unfinished block's ids and positions (the prepare merge packs the tails of all pieces)."""
        return list(self._ids), list(self._pos)

    def finish(self) -> int:
        """End of input: drops the unfinished block and returns how many tokens it held."""
        dropped = len(self._ids)
        self._new_block()
        return dropped


def tokenize_batches(tokenizer, texts: Iterable[str], batch_size: int = 256) -> Iterator[list[int]]:
    """Token ids per text, calling the (fast) tokenizer on `batch_size` texts at a time.

    Batches let the Rust tokenizer work in parallel; special tokens are not added (EOS is the
    packer's job, and a BOS per document would be a choice of the model recipe, not of packing).
    """
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) >= batch_size:
            yield from _encode(tokenizer, batch)
            batch = []
    if batch:
        yield from _encode(tokenizer, batch)


def _encode(tokenizer, batch: list[str]) -> list[list[int]]:
    out = tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return out["input_ids"]


def eos_id_for(tokenizer, spec: PackingSpec) -> int | None:
    """The EOS id to insert, or None when addEos is off; a tokenizer without EOS is an error."""
    if not spec.add_eos:
        return None
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("packing.addEos is true but the tokenizer has no eos_token")
    return int(eos)


def pack_texts(
    texts: Iterable[str], tokenizer, spec: PackingSpec, batch_size: int = 256
) -> tuple[Packer, Iterator[Block]]:
    """Tokenize and pack `texts`; returns the packer (for counts, call `finish()` after) and the blocks."""
    packer = Packer(spec.sequence_length, eos_id_for(tokenizer, spec))

    def blocks() -> Iterator[Block]:
        for ids in tokenize_batches(tokenizer, texts, batch_size):
            yield from packer.add(ids)

    return packer, blocks()
