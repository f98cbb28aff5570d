"""Vocabulary expansion (AceGPT-v1.5 style): add Arabic BPE tokens to a base tokenizer and model.

New merges are learned on a bounded sample of the cleaned Arabic text (the prepare sub-stage's
bottom-k sample: the documents with the smallest hashes, up to vocabulary.sampleMegabytes, the same
for any number of workers) with the base tokenizer's own pipeline (`train_new_from_iterator` keeps its
normalizer, pre-tokenizer and alphabet: byte-level or Metaspace with byte fallback), then appended,
in the order learned, after the base merges: base tokenization is unchanged wherever no new merge
applies. Only tokens not already in the vocabulary and buildable from existing tokens are added, and
only merges that can fire: an appended merge (left, right) fires only if the base merges, applied
first by their rank, leave `left` and `right` side by side in the new token's own text; one that
cannot would add a token no text ever produces (`unreachable_merges` finds them, repeatedly, since
removing one can strand merges built on it).
Each new embedding row (input and output) starts as the mean of the rows of the base tokens the new
token is made of, so the expanded model predicts as before, not from random rows. The prepare
sub-stage writes the expanded tokenizer and `vocabulary.json` (the new merges); the pretrain stage
resizes the model from them (`expand_model`).
"""

from __future__ import annotations

import heapq
import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

ARABIC_WORD = re.compile(r"[\u0600-\u06FF\u0750-\u077F\u08A0-\u08FF\uFB50-\uFDFF\uFE70-\uFEFF]+")


def fertility(tokenizer, texts: Iterable[str]) -> float:
    """Tokens per Arabic word over `texts` (lower is better: more text per context window and step)."""
    tokens = words = 0
    for text in texts:
        tokens += len(tokenizer(text, add_special_tokens=False)["input_ids"])
        words += len(ARABIC_WORD.findall(text))
    return tokens / words if words else float("nan")


def _pairs(merges: list) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


def learn_new_tokens(base, texts: list[str], count: int) -> list[tuple[str, str, str]]:
    """Up to `count` (token, left, right) merges, in learned order, whose token is new to `base`."""
    state = json.loads(base.backend_tokenizer.to_str())
    if state["model"]["type"] != "BPE":
        raise ValueError(f"vocabulary expansion needs a BPE tokenizer, not {state['model']['type']}")
    known = set(state["model"]["vocab"])
    size = len(known) + count
    for _ in range(4):  # many learned merges coincide with base tokens: ask for more until enough are new
        trained = base.train_new_from_iterator(iter(texts), vocab_size=size)
        learned = _pairs(json.loads(trained.backend_tokenizer.to_str())["model"]["merges"])
        out, have = [], set(known)
        for left, right in learned:
            token = left + right
            if token not in have and left in have and right in have:
                out.append((token, left, right))
                have.add(token)
                if len(out) == count:
                    return out
        if len(trained) < size:  # the corpus holds no more merges
            return out
        size *= 2
    return out


def _with_merges(state: dict, new: list[tuple[str, str, str]]) -> dict:
    """A copy of a tokenizer.json state with `new` appended to the vocabulary and merges."""
    state = json.loads(json.dumps(state))
    model = state["model"]
    as_strings = bool(model["merges"]) and isinstance(model["merges"][0], str)
    next_id = max([*model["vocab"].values(), *(t["id"] for t in state.get("added_tokens", []))]) + 1
    for token, left, right in new:
        model["vocab"][token] = next_id
        model["merges"].append(f"{left} {right}" if as_strings else [left, right])
        next_id += 1
    return state


def unreachable_merges(state: dict, new: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """The new merges that cannot fire after the base merges: the BPE model (without its whole-word
    shortcut, ignore_merges) does not turn the token's own text into that one token. Repeated until
    stable, since a merge built on an unreachable token is unreachable too."""
    from tokenizers import Tokenizer

    dead: list[tuple[str, str, str]] = []
    alive = list(new)
    while alive:
        trial = _with_merges(state, alive)
        trial["model"]["ignore_merges"] = False
        model = Tokenizer.from_str(json.dumps(trial)).model
        now = [m for m in alive if [t.value for t in model.tokenize(m[0])] != [m[0]]]
        if not now:
            return dead
        dead += now
        gone = set(now)
        alive = [m for m in alive if m not in gone]
    return dead


def expand_tokenizer(base, new: list[tuple[str, str, str]], out_dir: Path):
    """Writes base + new merges/tokens to `out_dir` and returns the reloaded tokenizer and new ids."""
    from transformers import PreTrainedTokenizerFast

    base.save_pretrained(out_dir)
    path = Path(out_dir) / "tokenizer.json"
    state = _with_merges(json.loads(path.read_text(encoding="utf-8")), new)
    path.write_text(json.dumps(state, ensure_ascii=False), encoding="utf-8")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out_dir)
    return tokenizer, [tokenizer.convert_tokens_to_ids(t) for t, _, _ in new]


class BottomSample:
    """The texts with the smallest hashes, up to `limit` bytes of UTF-8 (a bottom-k sample). The sample
    of a union is the bottom of the parts' samples, so pieces can be sampled apart and merged."""

    def __init__(self, limit: int) -> None:
        self.limit, self.size = limit, 0
        self.heap: list[tuple[int, str]] = []  # (-hash, text): the largest hash on top
        self.seen: set[int] = set()  # hashes in the sample (bounded by it), so copies count once

    def offer(self, h: int, text: str) -> None:
        if h in self.seen or (self.size >= self.limit and self.heap and -self.heap[0][0] < h):
            return
        heapq.heappush(self.heap, (-h, text))
        self.seen.add(h)
        self.size += len(text.encode("utf-8"))
        while self.size - len(self.heap[0][1].encode("utf-8")) >= self.limit:
            neg, dropped = heapq.heappop(self.heap)
            self.seen.discard(-neg)
            self.size -= len(dropped.encode("utf-8"))

    def sorted(self) -> list[tuple[int, str]]:
        return sorted((-neg, text) for neg, text in self.heap)


def merge_samples(streams: Iterable[Iterable[tuple[int, str]]], limit: int) -> list[str]:
    """The bottom-k sample of the union of hash-sorted samples, up to `limit` bytes."""
    texts, size, last = [], 0, None
    for h, text in heapq.merge(*streams):
        if h == last:
            continue
        last = h
        if size >= limit:
            break
        texts.append(text)
        size += len(text.encode("utf-8"))
    return texts


def sample_corpus(uri: str, limit: int, store=None) -> list[str]:
    """A bottom-k sample of `uri`'s documents (vocabulary.corpus), streamed: memory is the sample."""
    from dhad_api.data_prep import SourceSpec
    from dhad_trainer.data.dedup import exact_key
    from dhad_trainer.data.normalize import match_words
    from dhad_trainer.data.readers import iter_source

    sample = BottomSample(limit)
    for raw in iter_source(SourceSpec(uri=uri), store):
        if isinstance(raw, str) and raw.strip():
            sample.offer(exact_key(match_words(raw) or [raw])[0], raw)
    return [t for _, t in sample.sorted()]


VOCABULARY_FILE = "vocabulary.json"


def build_expanded_tokenizer(base, texts: list[str], count: int, out_dir: Path) -> dict:
    """Learns up to `count` new merges from `texts` (every 20th held out to measure fertility), drops
    those that cannot fire, writes the expanded tokenizer and vocabulary.json to `out_dir`."""
    out_dir = Path(out_dir)
    held_out, train = texts[::20], [t for i, t in enumerate(texts) if i % 20]
    learned = learn_new_tokens(base, train or held_out, count)
    state = json.loads(base.backend_tokenizer.to_str())
    dead = set(unreachable_merges(state, learned))
    new = [m for m in learned if m not in dead]
    tokenizer, _ = expand_tokenizer(base, new, out_dir)
    report = {
        "requested": count, "learned": len(learned), "unreachable": len(dead), "added": len(new),
        "vocab_before": len(base), "vocab_after": len(tokenizer),
        "fertility_before": round(fertility(base, held_out), 4),
        "fertility_after": round(fertility(tokenizer, held_out), 4),
        "sample_documents": len(texts), "sample_bytes": sum(len(t.encode("utf-8")) for t in texts),
        "held_out_documents": len(held_out),
    }
    (out_dir / VOCABULARY_FILE).write_text(json.dumps({**report, "new": new}, ensure_ascii=False, indent=1) + "\n")
    log.info("vocabulary: %s", report)
    return report


def init_new_rows(model, base_vocab: dict[str, int], new: list[tuple[str, str, str]], new_ids: list[int]) -> None:
    """Resizes the embeddings and sets each new row to the mean of its base sub-token rows."""
    import torch

    parts: dict[str, list[int]] = {}

    def pieces(token: str) -> list[int]:
        return [base_vocab[token]] if token in base_vocab else parts[token]

    for token, left, right in new:
        parts[token] = pieces(left) + pieces(right)
    rows = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(max(rows, max(new_ids) + 1), mean_resizing=False)
    tables = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != tables[0].data_ptr():
        tables.append(out.weight)
    with torch.no_grad():
        for table in tables:
            for (token, _, _), new_id in zip(new, new_ids, strict=True):
                table[new_id] = table[parts[token]].mean(dim=0)


def save_on_any_rank(model, out_dir: Path) -> None:
    """HF format without `save_pretrained`, which (transformers 5.24) writes nothing on ranks other than
    global rank 0 once a process group exists, while every node needs its own copy here."""
    from safetensors.torch import save_model

    model.config.save_pretrained(out_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)
    save_model(model, str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def expand_model(model_dir: Path, tokenizer_dir: Path, out_dir: Path, dtype: str = "auto") -> dict:
    """The model in `model_dir` resized for the expanded tokenizer in `tokenizer_dir` (which holds
    vocabulary.json), new rows initialised from their parts; model and tokenizer written to `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = json.loads((Path(tokenizer_dir) / VOCABULARY_FILE).read_text(encoding="utf-8"))
    new = [tuple(m) for m in info["new"]]
    base = AutoTokenizer.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    init_new_rows(model, base.get_vocab(), new, [tokenizer.convert_tokens_to_ids(t) for t, _, _ in new])
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    save_on_any_rank(model, Path(out_dir))
    tokenizer.save_pretrained(out_dir)
    return {k: v for k, v in info.items() if k != "new"}


def expand_vocabulary(model_dir: Path, texts: list[str], count: int, out_dir: Path, dtype: str = "auto") -> dict:
    """Tokenizer and model in one call (tests, local use): `build_expanded_tokenizer`, then `expand_model`."""
    from transformers import AutoTokenizer

    report = build_expanded_tokenizer(AutoTokenizer.from_pretrained(model_dir), texts, count, Path(out_dir))
    expand_model(model_dir, Path(out_dir), Path(out_dir), dtype)
    return report
