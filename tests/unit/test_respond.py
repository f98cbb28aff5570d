"""The respond stage against the scripted OpenAI server: planted outcomes counted exactly, resume after
an exception or SIGTERM without paying twice, damaged journal, schemas, s3 store and n responses."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dhad_api.jobs import SFTJobSpec
from dhad_trainer.stages import respond as stage
from dhad_trainer.stages.base import StageRun
from tests.support.openai_server import OpenAIServer, Reply, prompt_of

KEY = "sk-respond-test"
REPO = Path(__file__).resolve().parents[2]
FAST = {"backoff_base_s": 0.01, "backoff_max_s": 0.05}
SAME = "هذه إجابة ثابتة تتكرر كما هي لكل سؤال من هذا النوع دون أي تغيير."


def answer(prompt: str) -> str:
    n = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16)
    return f"هذا جواب مفصل ومفيد رقم {n} يشرح الفكرة بوضوح ويعطي أمثلة من الحياة اليومية."


def script(body, attempt):
    """Real answers for good prompts (the default echo is a prompt copy); markers plant the rest."""
    p = prompt_of(body)
    m = re.search(r"\[(\d{3})(?:x(\d+))?\]", p)
    if (m and attempt <= int(m.group(2) or 1)) or re.search(r"\[(refuse|english|truncate)\]", p):
        return None
    if "[copy]" in p:
        return Reply(content=p)
    return Reply(content=SAME if "[same]" in p else answer(p))


def server(**kw) -> OpenAIServer:
    kw.setdefault("retry_after_s", 0.05)
    return OpenAIServer(KEY, script=script, **kw)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return path


def make_run(tmp: Path, base_url: str, prompts: list[dict], *, concurrency: int = 4, **respond) -> StageRun:
    respond = {"prompts": prompts, "teacher": {"endpoint": {
        "baseUrl": base_url, "model": "teacher-x", "maxConcurrency": concurrency,
        "apiKeySecretRef": {"name": "teacher", "key": "api-key"}}}} | respond
    spec = SFTJobSpec.model_validate({"model": {"uri": "/models/base"}, "storage": {"bucket": "dhad"},
                                      "respond": respond})
    return StageRun(spec=spec, stage="respond", model_dir=tmp / "model", work_dir=tmp / "work",
                    output_dir=tmp / "out")


def rows(out: Path, name: str = "data-*.jsonl") -> list[dict]:
    return [json.loads(line) for f in sorted(out.glob(name)) for line in f.read_text().splitlines()]


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("DHAD_TEACHER_API_KEY", KEY)


def test_planted_outcomes_are_counted_exactly_and_a_rerun_pays_nothing(tmp_path):
    good = [f"سؤال رقم {i}: ما رأيك في القراءة قبل النوم؟" for i in range(8)]
    planted = {"refuse": 2, "english": 2, "truncate": 2, "copy": 1, "same": 3, "429x2": 2, "500": 2}
    texts = good + [f"[{m}] طلب رقم {i} عن الطبخ" for m, k in planted.items() for i in range(k)]
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": t} for t in texts] + [{"prompt": good[0]}, {"x": 1}, "{broken"])
    with server() as srv:
        run = make_run(tmp_path, srv.base_url, [{"uri": str(src), "schema": "prompt-completion"}])
        stats = stage.respond(run, shard_rows=5, **FAST)
        assert srv.counts == {t: 3 if "429x2" in t else 2 if "[500]" in t else 1 for t in texts}
        assert srv.unauthorized == 0
        first = rows(run.output_dir)
        again = stage.respond(run, shard_rows=5, **FAST)
        assert sum(srv.counts.values()) == 22 + 4 + 2  # nothing new was sent
    assert stats["rejected"] == {"refusal": 2, "not_arabic": 2, "truncated": 2, "prompt_copy": 1, "duplicate": 2}
    expect = {"prompts": 23, "duplicate_prompts": 1, "bad_records": 2, "requests": 22, "cached": 0, "sent": 22,
              "http_requests": 28, "retries": {"429": 4, "500": 2}, "failed": {}, "pending": 0,
              "responses": 22, "accepted": 13, "tokens": {"prompt": 220, "completion": 440}, "cost": 0.0}
    assert {k: stats[k] for k in expect} == expect
    assert again["cached"] == 22 and again["sent"] == 0 and again["accepted"] == 13
    assert rows(run.output_dir) == first and len(first) == 13
    assert stats["shards"] == ["data-00000.jsonl", "data-00001.jsonl", "data-00002.jsonl"]
    assert json.loads((run.output_dir / "stats.json").read_text())["rejected"] == again["rejected"]
    rejected = rows(run.output_dir, "rejected.jsonl")
    assert sorted(r["reason"] for r in rejected) == sorted(k for k, v in stats["rejected"].items() for _ in range(v))
    row = first[0]
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    prov = row["provenance"]
    assert prov["teacher"] == "teacher-x" and prov["backend"] == "endpoint" and prov["finish_reason"] == "stop"
    assert prov["settings"] == {"max_new_tokens": 1024, "temperature": 0.7, "top_p": 0.95, "n": 1}
    assert prov["usage"] == {"prompt_tokens": 10, "completion_tokens": 20} and prov["time"].endswith("+00:00")
    assert len(prov["prompt_hash"]) == 32 and prov["source"] == f"{src}#0"
    assert srv.bodies[0]["max_tokens"] == 1024 and srv.bodies[0]["temperature"] == 0.7
    assert KEY not in (run.output_dir / "stats.json").read_text() + (run.output_dir / "cache.jsonl").read_text()


def test_exception_after_n_batches_then_rerun_finishes_without_repeats(tmp_path):
    texts = [f"سؤال رقم {i} عن تاريخ المدن العربية" for i in range(37)] + ["[429] سؤال مؤجل عن الشعر"]
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": t} for t in texts])

    def boom(batch_no: int) -> None:
        if batch_no == 2:
            raise RuntimeError("injected")

    with server(latency_s=0.01) as srv:
        run = make_run(tmp_path, srv.base_url, [{"uri": str(src), "schema": "prompt-completion"}])
        with pytest.raises(RuntimeError, match="injected"):
            stage.respond(run, batch=5, on_batch=boom, **FAST)
        partial = json.loads((run.output_dir / "stats.json").read_text())
        journaled = len((run.output_dir / "cache.jsonl").read_text().splitlines())
        assert 10 <= journaled < 38 and partial["pending"] == 38 - journaled
        assert len(srv.counts) == journaled  # every prompt the server saw was answered and journaled
        stats = stage.respond(run, batch=5, **FAST)
        assert srv.counts == {t: 2 if "[429]" in t else 1 for t in texts}  # in-flight answers were kept
    assert stats["cached"] == journaled and stats["sent"] == 38 - journaled and stats["pending"] == 0
    assert stats["accepted"] == 38 and len({r["provenance"]["request"] for r in rows(run.output_dir)}) == 38


CHILD = """
import json, logging, sys
from pathlib import Path
from dhad_api.jobs import SFTJobSpec
from dhad_trainer.stages import respond as stage
from dhad_trainer.stages.base import StageRun
tmp = Path(sys.argv[1])
spec = SFTJobSpec.model_validate(json.loads((tmp / "spec.json").read_text()))
run = StageRun(spec=spec, stage="respond", model_dir=tmp, work_dir=tmp, output_dir=tmp / "out")
stage.respond(run, batch=1)
"""


def test_sigterm_mid_way_stops_cleanly_and_a_new_process_finishes(tmp_path):
    texts = [f"سؤال رقم {i} عن الرياضة والصحة" for i in range(60)]
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": t} for t in texts])
    with server(latency_s=0.05) as srv:
        run = make_run(tmp_path, srv.base_url, [{"uri": str(src), "schema": "prompt-completion"}], concurrency=2)
        (tmp_path / "spec.json").write_text(run.spec.model_dump_json(by_alias=True))
        env = os.environ | {"PYTHONPATH": f"{REPO}:{REPO / 'api'}:{REPO / 'trainer'}"}
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], env=env, cwd=REPO)
        cache, deadline = tmp_path / "out" / "cache.jsonl", time.monotonic() + 30
        while not (cache.exists() and len(cache.read_bytes().splitlines()) >= 6) and time.monotonic() < deadline:
            time.sleep(0.02)
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) == 128 + signal.SIGTERM
        done = len(cache.read_text().splitlines())
        assert 6 <= done < 60 and sum(srv.counts.values()) == done  # stopped, and lost nothing in flight
        stats = stage.respond(run)
        assert srv.counts == dict.fromkeys(texts, 1)
    assert stats["cached"] == done and stats["accepted"] == 60


def test_a_journal_line_cut_by_a_kill_is_asked_again(tmp_path):
    texts = [f"سؤال رقم {i} عن الزراعة" for i in range(5)]
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": t} for t in texts])
    with server() as srv:
        run = make_run(tmp_path, srv.base_url, [{"uri": str(src), "schema": "prompt-completion"}], concurrency=1)
        stage.respond(run)
        cache = run.output_dir / "cache.jsonl"
        data = cache.read_bytes()
        cache.write_bytes(data[: data.rstrip(b"\n").rfind(b"\n") + 40])  # last line cut mid-write
        stats = stage.respond(run)
        assert sorted(srv.counts.values()) == [1, 1, 1, 1, 2]
    assert stats["cached"] == 4 and stats["sent"] == 1 and stats["accepted"] == 5
    assert all(json.loads(line) for line in cache.read_text().splitlines())


class DictStore:
    """An object store holding s3:// keys in memory (the readers' ObjectStore protocol)."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files

    def open(self, uri: str):
        import io

        return io.BytesIO(self.files[uri])

    def list(self, prefix: str):
        return sorted(k for k in self.files if k.startswith(prefix))


def test_messages_parquet_from_s3_system_prompt_and_n_responses(tmp_path):
    chats = [
        [{"role": "user", "content": "ما عاصمة الأردن؟"}, {"role": "assistant", "content": "عمّان"}],
        [{"role": "system", "content": "أجب باختصار."}, {"role": "user", "content": "ما أطول نهر؟"}],
        [{"role": "user", "content": "مرحبا"}, {"role": "assistant", "content": "أهلا"},
         {"role": "user", "content": "كيف حالك؟"}],
    ]
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"conv": chats}), buf)
    store = DictStore({"s3://bkt/prompts/part-0.parquet": buf.getvalue().to_pybytes()})
    with server() as srv:
        run = make_run(tmp_path, srv.base_url, [{"uri": "s3://bkt/prompts/", "schema": "messages",
                       "fields": {"messages": "conv"}}], systemPrompt="أنت مساعد عربي مفيد.",
                       responsesPerPrompt=2, generation={"temperature": 0.2, "maxNewTokens": 64})
        run.data_store = store
        stats = stage.respond(run, **FAST)
        sent = {prompt_of(b): b for b in srv.bodies}
    assert sent["ما عاصمة الأردن؟"]["messages"] == [{"role": "system", "content": "أنت مساعد عربي مفيد."}, chats[0][0]]
    assert sent["ما أطول نهر؟"]["messages"] == chats[1]  # its own system turn is kept
    assert sent["كيف حالك؟"]["messages"][1:] == chats[2] and sent["كيف حالك؟"]["n"] == 2
    assert stats["requests"] == 3 and stats["responses"] == 6 and stats["accepted"] == 6
    assert stats["tokens"] == {"prompt": 30, "completion": 120}
    out = rows(run.output_dir)
    assert sorted(r["provenance"]["choice"] for r in out) == [0, 0, 0, 1, 1, 1]
    assert all(r["messages"][-1]["role"] == "assistant" and r["messages"][0]["role"] == "system" for r in out)


def test_unanswered_requests_are_listed_fail_the_attempt_and_only_they_are_asked_again(tmp_path):
    texts = [f"سؤال رقم {i} عن السفر" for i in range(3)] + ["[400] سؤال مرفوض من الخادم"]
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": t} for t in texts])
    with server() as srv:
        run = make_run(tmp_path, srv.base_url, [{"uri": str(src), "schema": "prompt-completion"}])
        with pytest.raises(RuntimeError, match=r"1 of 4 teacher requests failed"):
            stage.respond(run, **FAST)
        failed = rows(run.output_dir, "failed.jsonl")
        assert [(f["reason"], f["messages"][-1]["content"]) for f in failed] == [("400", texts[-1])]
        stats = json.loads((run.output_dir / "stats.json").read_text())
        assert stats["failed"] == {"400": 1} and stats["accepted"] == 3 and stats["pending"] == 0
        again = stage.respond(run, **FAST)  # the script answers a [400] prompt the second time
        assert srv.counts == {t: 2 if "[400]" in t else 1 for t in texts}
    assert again["cached"] == 3 and again["sent"] == 1 and again["accepted"] == 4 and again["failed"] == {}
    assert rows(run.output_dir, "failed.jsonl") == []


def test_missing_api_key_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("DHAD_TEACHER_API_KEY")
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "سؤال"}])
    run = make_run(tmp_path, "http://127.0.0.1:9/v1", [{"uri": str(src), "schema": "prompt-completion"}])
    with pytest.raises(ValueError, match="DHAD_TEACHER_API_KEY"):
        stage.respond(run)
