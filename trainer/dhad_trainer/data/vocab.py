"""Vocabulary expansion (AceGPT-v1.5 style): add Arabic BPE tokens to a base tokenizer and model.

New merges are learned on Arabic text with the base tokenizer's own pipeline (`train_new_from_iterator`
keeps its normalizer, pre-tokenizer and byte alphabet, so the merges are compatible), then appended,
in the order learned, after the base merges: base tokenization is unchanged wherever no new merge
applies. Only tokens not already in the vocabulary and buildable from existing tokens are added.
Each new embedding row (input and output) starts as the mean of the rows of the base tokens the new
token is made of, so the expanded model predicts as before, not from random rows.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
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


def expand_tokenizer(base, new: list[tuple[str, str, str]], out_dir: Path):
    """Writes base + new merges/tokens to `out_dir` and returns the reloaded tokenizer and new ids."""
    from transformers import AutoTokenizer

    base.save_pretrained(out_dir)
    path = Path(out_dir) / "tokenizer.json"
    state = json.loads(path.read_text(encoding="utf-8"))
    model = state["model"]
    as_strings = bool(model["merges"]) and isinstance(model["merges"][0], str)
    next_id = max([*model["vocab"].values(), *(t["id"] for t in state.get("added_tokens", []))]) + 1
    ids = []
    for token, left, right in new:
        model["vocab"][token] = next_id
        model["merges"].append(f"{left} {right}" if as_strings else [left, right])
        ids.append(next_id)
        next_id += 1
    path.write_text(json.dumps(state, ensure_ascii=False), encoding="utf-8")
    return AutoTokenizer.from_pretrained(out_dir), ids


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


def expand_vocabulary(model_dir: Path, texts: list[str], held_out: list[str], count: int, out_dir: Path,
                      dtype: str = "auto") -> dict:
    """Adds up to `count` Arabic tokens to the model in `model_dir`; writes the result to `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoTokenizer.from_pretrained(model_dir)
    new = learn_new_tokens(base, texts, count)
    tokenizer, new_ids = expand_tokenizer(base, new, out_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    init_new_rows(model, base.get_vocab(), new, new_ids)
    save_on_any_rank(model, Path(out_dir))
    tokenizer.save_pretrained(out_dir)
    report = {
        "requested": count, "added": len(new), "vocab_before": len(base), "vocab_after": len(tokenizer),
        "fertility_before": round(fertility(base, held_out), 4),
        "fertility_after": round(fertility(tokenizer, held_out), 4),
        "held_out_documents": len(held_out),
    }
    (Path(out_dir) / "vocabulary.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("vocabulary: %s", report)
    return report


def documents_from_blocks(shards: Iterable[Path], tokenizer, eos_id: int | None) -> Iterator[str]:
    """The prepared corpus as text again: token streams split at EOS (or per block without EOS)."""
    import pyarrow.parquet as pq

    pending: list[int] = []
    for shard in shards:
        for ids in pq.read_table(shard, columns=["input_ids"]).column(0).to_pylist():
            if eos_id is None:
                yield tokenizer.decode(ids)
                continue
            for tok in ids:
                if tok == eos_id:
                    if pending:
                        yield tokenizer.decode(pending)
                    pending = []
                else:
                    pending.append(tok)
