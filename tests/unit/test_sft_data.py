"""SFT/prompt dataset loading: three layouts, field mapping, bad records counted, system prompt, mixing."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dhad_api.stages import SFTDataset
from dhad_trainer.data.conversations import ARABIC_SYSTEM_PROMPT, load_prompts, load_sft_mix, mix
from dhad_trainer.data.readers import DataError

USER, ASSISTANT = "ما عاصمة تونس؟", "عاصمة تونس هي مدينة تونس."


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + "\n",
                    encoding="utf-8")
    return str(path)


def test_three_layouts_become_the_same_conversation(tmp_path):
    expected = [{"role": "user", "content": USER}, {"role": "assistant", "content": ASSISTANT}]
    msgs = write_jsonl(tmp_path / "m.jsonl", [{"conv": [{"from": "human", "value": USER}, {"from": "gpt", "value": ASSISTANT}]}])
    inst = write_jsonl(tmp_path / "i.jsonl", [{"q": USER, "a": ASSISTANT}])
    pq.write_table(pa.table({"prompt": [USER], "completion": [ASSISTANT]}), tmp_path / "p.parquet")
    datasets = [
        SFTDataset(uri=msgs, fields={"messages": "conv"}),
        SFTDataset(uri=inst, schema="instruction-response", fields={"instruction": "q", "response": "a"}),
        SFTDataset(uri=str(tmp_path / "p.parquet"), schema="prompt-completion"),
    ]
    ds, counts = load_sft_mix(datasets)
    assert [row["messages"] for row in ds] == [expected] * 3
    assert [c["used"] for c in counts] == [1, 1, 1] and all(c["bad"] == 0 for c in counts)


def test_instruction_input_is_appended_and_system_prompt_added_only_where_missing(tmp_path):
    inst = write_jsonl(tmp_path / "i.jsonl", [{"instruction": "لخّص النص", "input": "نص قصير", "response": "ملخص"}])
    msgs = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "system", "content": "نظام"},
                                                            {"role": "user", "content": "س"},
                                                            {"role": "assistant", "content": "ج"}]}])
    ds, _ = load_sft_mix([SFTDataset(uri=inst, schema="instruction-response"), SFTDataset(uri=msgs)],
                         system_prompt=ARABIC_SYSTEM_PROMPT)
    by_user = {row["messages"][1]["content"]: row["messages"] for row in ds}
    assert by_user["لخّص النص\n\nنص قصير"][0] == {"role": "system", "content": ARABIC_SYSTEM_PROMPT}
    assert by_user["س"][0]["content"] == "نظام"  # an existing system turn is kept


def test_bad_records_are_counted_and_skipped(tmp_path):
    good = {"messages": [{"role": "user", "content": USER}, {"role": "assistant", "content": ASSISTANT}]}
    bad = [
        "{not json",
        {"messages": "text"},
        {"messages": [{"role": "user", "content": USER}]},  # no assistant turn
        {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "late"},
                      {"role": "assistant", "content": "y"}]},
        [1, 2],
    ]
    path = write_jsonl(tmp_path / "d.jsonl", [good, *bad, good])
    ds, counts = load_sft_mix([SFTDataset(uri=path)])
    assert len(ds) == 2
    assert counts == [{"uri": path, "records": 9, "bad": 7, "used": 2}]
    with pytest.raises(DataError, match="no usable"):
        load_sft_mix([SFTDataset(uri=write_jsonl(tmp_path / "e.jsonl", bad))])


def test_weighted_mix_takes_each_share_of_the_total_and_is_seeded():
    big, small = [("big", i) for i in range(30)], [("small", i) for i in range(10)]
    out, used = mix([big, small], [1.0, 3.0], seed=1)
    assert used == [10, 30] and len(out) == 40
    assert sum(x[0] == "small" for x in out) == 30  # upsampled: every small record thrice
    assert sorted(x for x in out if x[0] == "small") == sorted(small * 3)
    assert out == mix([big, small], [1.0, 3.0], seed=1)[0]
    assert out != mix([big, small], [1.0, 3.0], seed=2)[0]


def test_prompts_from_each_layout_are_deduplicated(tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", [{"prompt": USER}, {"prompt": USER}, {"prompt": 3}, {"text": "x"}])
    m = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "س١"},
                                                         {"role": "assistant", "content": "ج١"},
                                                         {"role": "user", "content": "س٢"}]}])
    prompts, counts = load_prompts([SFTDataset(uri=p, schema="prompt-completion"), SFTDataset(uri=m)])
    assert prompts[0] == [{"role": "user", "content": USER}]
    assert [t["content"] for t in prompts[1]] == ["س١", "ج١", "س٢"]  # multi-turn prompt ends on the user
    assert [(c["records"], c["bad"], c["used"]) for c in counts] == [(4, 2, 1), (1, 0, 1)]
