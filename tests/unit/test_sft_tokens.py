"""SFT at the token level: which label ids are trained, and that packing leaks nothing across documents."""

from __future__ import annotations

import json

import pytest
import torch

from dhad_trainer.data.chat import IM_END
from dhad_trainer.stages import sft
from tests.support.alignment import INSTRUCTIONS, sft_spec, stage_run, tiny_lm


def build(tmp_path, name, data=None, **training):
    run = stage_run(sft_spec(data, **training), "sft", tmp_path / name, tiny_lm())
    trainer, tokenizer, _ = sft.build_trainer(run)
    return trainer, tokenizer


def expected_labels(tokenizer, messages):
    """Exactly each assistant turn's content followed by <|im_end|>, nothing else."""
    ids = []
    for m in messages:
        if m["role"] == "assistant":
            ids += tokenizer.encode(m["content"] + IM_END, add_special_tokens=False)
    return ids


@pytest.fixture(scope="module")
def conversations():
    return [json.loads(line)["messages"] for line in INSTRUCTIONS.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    return build(tmp_path_factory.mktemp("packed"), "packed", packing=True)


def test_unpacked_labels_are_exactly_assistant_content_and_im_end(tmp_path, conversations):
    trainer, tokenizer = build(tmp_path, "plain", packing=False)
    by_ids = {}
    for row in trainer.train_dataset:
        trained = [label for label in row["labels"] if label != -100]
        by_ids[tuple(row["input_ids"])] = trained
    for messages in conversations:
        ids = tokenizer.apply_chat_template(messages, tokenize=False)
        key = tuple(tokenizer(ids, add_special_tokens=False)["input_ids"])
        assert by_ids[key] == expected_labels(tokenizer, messages)
    assert tokenizer.decode(by_ids[key]).endswith(IM_END)


def test_bfd_packing_keeps_every_document_whole_and_masks_the_same_tokens(packed, conversations):
    trainer, tokenizer = packed
    expected = {}
    for messages in conversations:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        expected[tuple(tokenizer(text, add_special_tokens=False)["input_ids"])] = expected_labels(tokenizer, messages)
    seen = []
    for row in trainer.train_dataset:
        assert sum(row["seq_lengths"]) == len(row["input_ids"]) <= 256
        batch = trainer.data_collator([row])
        ids, labels, pos = batch["input_ids"][0].tolist(), batch["labels"][0].tolist(), batch["position_ids"][0]
        assert "attention_mask" not in batch  # padding-free: documents are told apart by position_ids
        start = 0
        for length in row["seq_lengths"]:
            doc = tuple(ids[start:start + length])
            assert pos[start:start + length].tolist() == list(range(length))  # positions restart per document
            assert [t for t in labels[start:start + length] if t != -100] == expected[doc]
            seen.append(doc)
            start += length
    assert sorted(seen) == sorted(expected)  # every conversation exactly once, none cut
    assert len(trainer.train_dataset) < len(conversations) / 2  # and they really share rows


def test_packed_logits_match_each_document_alone(packed):
    trainer, _ = packed
    model = trainer.model.eval()
    rows = [r for r in trainer.train_dataset if len(r["seq_lengths"]) >= 3][:2]
    assert rows, "expected rows holding three or more documents"
    with torch.no_grad():
        for row in rows:
            batch = trainer.data_collator([row])
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            together = model(**inputs).logits[0]
            leaky = model(input_ids=batch["input_ids"]).logits[0]  # control: one causal mask over the row
            start, leak = 0, 0.0
            for length in row["seq_lengths"]:
                alone = model(input_ids=batch["input_ids"][:, start:start + length]).logits[0]
                assert torch.allclose(together[start:start + length], alone, atol=1e-4), "packing leaked"
                leak = max(leak, (leaky[start:start + length] - alone).abs().max().item())
                start += length
            assert leak > 1e-2  # the comparison does see attention across documents when it happens


def test_prompt_completion_trains_only_the_completion(tmp_path):
    data = tmp_path / "pc.jsonl"
    data.write_text(json.dumps({"prompt": "ما لون السماء؟", "completion": "زرقاء صافية."}, ensure_ascii=False) + "\n")
    dataset = [{"uri": str(data), "schema": "prompt-completion"}]
    for assistant_only, tail in ((True, IM_END), (False, IM_END + "\n")):
        trainer, tokenizer = build(tmp_path, f"pc-{assistant_only}", dataset, packing=False,
                                   assistantOnlyLoss=assistant_only)
        row = trainer.train_dataset[0]
        trained = [t for t in row["labels"] if t != -100]
        assert tokenizer.decode(trained) == "زرقاء صافية." + tail
        assert "ما لون السماء" in tokenizer.decode(row["input_ids"])


def test_custom_chat_template_renders_training_text(tmp_path):
    template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}"
                "{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}{{ '### ' + m['content'] + '\\n' }}"
                "{% endif %}{% endfor %}")
    trainer, tokenizer = build(tmp_path, "custom", packing=False, chatTemplate={"source": "custom", "template": template})
    assert tokenizer.decode(trainer.train_dataset[0]["input_ids"]).startswith("### ")
