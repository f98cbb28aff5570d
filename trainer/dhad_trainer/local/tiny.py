"""Tiny, deterministic Arabic model bootstrap: the starting point of every test and of the demo.

No Hugging Face hub is reachable, so a byte-level BPE tokenizer is trained on the project's own Arabic
text and a random Llama is built on top of it. Same arguments and seed give byte-identical files, so
tests that train from it are reproducible.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from dhad_trainer.data.chat import (
    ASSETS,
    ENDOFTEXT,
    IM_END,
    IM_START,
    PAD,
    SPECIAL_TOKENS,
    load_chat_template,
)

DEFAULT_CORPUS = ASSETS / "arabic_corpus.txt"
DEFAULT_INSTRUCTIONS = ASSETS / "arabic_instructions.jsonl"

Kind = Literal["causal-lm", "reward"]
__all__ = ["ASSETS", "DEFAULT_CORPUS", "DEFAULT_INSTRUCTIONS", "ENDOFTEXT", "IM_END", "IM_START", "PAD", "SPECIAL_TOKENS",
           "init_tiny_model", "load_chat_template", "train_tokenizer"]


def iter_training_text(corpus_path: Path, instructions_path: Path | None) -> Iterator[str]:
    """Corpus lines, then the instruction set's messages and role names (so ChatML headers get merges)."""
    for line in Path(corpus_path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            yield line
    if instructions_path is not None:
        for line in Path(instructions_path).read_text(encoding="utf-8").splitlines():
            if line.strip():
                for message in json.loads(line)["messages"]:
                    yield message["content"]
                yield from ("system", "user", "assistant")


def train_tokenizer(
    vocab_size: int = 2048,
    corpus_path: Path = DEFAULT_CORPUS,
    instructions_path: Path | None = DEFAULT_INSTRUCTIONS,
):
    """Byte-level BPE (all 256 bytes in the alphabet, so any UTF-8 text round-trips) as a fast tokenizer.

    eos is <|im_end|> (what a chat turn ends with, so generation, GRPO/RLOO completion masks and
    SFT all stop on the same token); bos is <|endoftext|> (not added automatically); pad is <|pad|>.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter_training_text(corpus_path, instructions_path), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=ENDOFTEXT,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=None,
        chat_template=load_chat_template(),
        model_max_length=512,
    )


def init_tiny_model(
    output_dir: str | Path,
    *,
    vocab_size: int = 2048,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_position: int = 512,
    seed: int = 0,
    corpus_path: Path = DEFAULT_CORPUS,
    instructions_path: Path | None = DEFAULT_INSTRUCTIONS,
    kind: Kind = "causal-lm",
) -> Path:
    """Write tokenizer + random Llama (safetensors) to `output_dir` and return it.

    kind="causal-lm" gives LlamaForCausalLM; kind="reward" gives LlamaForSequenceClassification with one
    label (a scalar reward head), for reward-model and RLAIF tests. `vocab_size` is an upper bound: the
    model uses the tokenizer's real size, which a small corpus may keep below it.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    if kind not in ("causal-lm", "reward"):
        raise ValueError(f"kind must be 'causal-lm' or 'reward', not {kind!r}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(vocab_size, corpus_path, instructions_path)
    tokenizer.model_max_length = max_position
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position,
        tie_word_embeddings=False,
        bos_token_id=ids[ENDOFTEXT],
        eos_token_id=ids[IM_END],
        pad_token_id=ids[PAD],
    )
    torch.manual_seed(seed)
    if kind == "reward":
        config.num_labels = 1
        model = LlamaForSequenceClassification(config)
    else:
        model = LlamaForCausalLM(config)
        # Stop on either end marker: <|im_end|> for chat turns, <|endoftext|> for raw documents.
        model.generation_config = GenerationConfig(
            bos_token_id=ids[ENDOFTEXT],
            eos_token_id=[ids[IM_END], ids[ENDOFTEXT]],
            pad_token_id=ids[PAD],
        )
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
