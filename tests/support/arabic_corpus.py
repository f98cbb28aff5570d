"""Generated Arabic documents with planted exact and near duplicates, for the prepare tests and bench.

Words are drawn from the project's Arabic corpus vocabulary, so generated documents share almost no
5-word shingles by chance; a planted near duplicate changes `edits` words of an earlier document
(about 0.9 Jaccard for 60-word documents and 1 edit), a planted exact duplicate is a copy respelled
with tatweel and tashkeel (a different string with the same matching key).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path


def vocabulary() -> list[str]:
    from dhad_trainer.local.tiny import DEFAULT_CORPUS

    words = sorted({w for w in DEFAULT_CORPUS.read_text(encoding="utf-8").split() if w.isalpha()})
    return words


@dataclass
class Planted:
    """Indexes (in generation order) of planted copies and of the documents they copy."""

    exact: dict[int, int] = field(default_factory=dict)
    near: dict[int, int] = field(default_factory=dict)


def respell(text: str) -> str:
    """The same matching key, another string: a tatweel inside and a fatha on the first long word."""
    words = text.split(" ")
    for i, w in enumerate(words):
        if len(w) > 3:
            words[i] = w[0] + "\u0640" + w[1:2] + "\u064e" + w[2:]
            break
    return " ".join(words)


def documents(count: int, seed: int = 0, exact_rate: float = 0.05, near_rate: float = 0.05,
              median_words: float = 60, edits: int = 1) -> tuple[list[str], Planted]:
    """`count` documents; about exact_rate and near_rate of them are planted copies of earlier ones."""
    import math

    words = vocabulary()
    rng = random.Random(seed)
    docs: list[str] = []
    planted = Planted()
    for i in range(count):
        roll = rng.random()
        if docs and roll < exact_rate:
            j = rng.randrange(len(docs))
            planted.exact[i] = j
            docs.append(respell(docs[j]))
        elif docs and roll < exact_rate + near_rate:
            j = rng.randrange(len(docs))
            toks = docs[j].split(" ")
            for _ in range(edits):
                toks[rng.randrange(len(toks))] = rng.choice(words)
            planted.near[i] = j
            docs.append(" ".join(toks))
        else:
            n = max(30, int(rng.lognormvariate(math.log(median_words), 0.4)))
            docs.append(" ".join(rng.choice(words) for _ in range(n)))
    return docs, planted


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


def byte_level_tokenizer(path: Path, texts: list[str], vocab_size: int = 500) -> Path:
    """A small byte-level BPE with an EOS token, trained on `texts`, saved as a HF tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(path)
    return path
