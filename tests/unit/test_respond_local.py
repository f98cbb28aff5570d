"""The respond stage with a local transformers teacher (the tiny model), and its output read the way the
SFT sub-stage reads a messages dataset: sft_data.load_sft_mix + the chat template's assistant mask."""

from __future__ import annotations

import json

import transformers

from dhad_api.jobs import SFTJobSpec
from dhad_api.stages import SFTDataset
from dhad_trainer.data.conversations import load_sft_mix
from dhad_trainer.local import tiny
from dhad_trainer.stages import respond as stage
from dhad_trainer.stages.base import StageRun


def test_tiny_local_teacher_answers_resumes_from_cache_and_output_loads_as_sft_messages(tmp_path):
    teacher_dir = tiny.init_tiny_model(tmp_path / "teacher", seed=1)
    prompts = [json.loads(line) for line in tiny.ASSETS.joinpath("arabic_prompts.jsonl").read_text().splitlines()][:5]
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in prompts))
    spec = SFTJobSpec.model_validate({
        "model": {"uri": "/models/base"}, "storage": {"bucket": "dhad"},
        "respond": {"prompts": [{"uri": str(src), "schema": "prompt-completion"}],
                    "teacher": {"model": {"uri": "/models/teacher"}, "useVllm": True},
                    "systemPrompt": "أنت مساعد عربي مفيد.", "responsesPerPrompt": 2,
                    "generation": {"maxNewTokens": 12, "temperature": 0.9},
                    "quality": {"minArabicRatio": 0.0, "dropTruncated": False}},
    })
    run = StageRun(spec=spec, stage="respond", model_dir=tmp_path / "base", work_dir=tmp_path / "work",
                   output_dir=tmp_path / "out", inputs={"teacher": teacher_dir})
    result = stage.run(run)  # useVllm on a CPU run falls back to transformers
    stats = json.loads((run.output_dir / "stats.json").read_text())
    assert stats["backend"] == "transformers" and stats["teacher"] == "/models/teacher"
    assert stats["requests"] == 5 and stats["responses"] == 10 and stats["sent"] == 5
    assert stats["accepted"] + sum(stats["rejected"].values()) == 10 and stats["accepted"] > 0
    assert stats["tokens"]["prompt"] > 0 and 0 < stats["tokens"]["completion"] <= 5 * 2 * 12
    assert result.metrics["accepted"] == stats["accepted"]

    again = stage.respond(run)  # everything from the journal: the model is loaded but not asked
    assert again["cached"] == 5 and again["sent"] == 0 and again["accepted"] == stats["accepted"]

    ds, counts = load_sft_mix([SFTDataset(uri=stage.dataset_glob(run.output_dir), schema="messages")])
    assert len(ds) == stats["accepted"] == counts[0]["records"] and counts[0]["bad"] == 0
    tok = transformers.AutoTokenizer.from_pretrained(teacher_dir)
    for row in ds:
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        enc = tok.apply_chat_template(row["messages"], return_dict=True, return_assistant_tokens_mask=True)
        assert sum(enc["assistant_masks"]) > 0  # the answer is what SFT trains on
