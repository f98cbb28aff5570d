"""The prepare sub-stage's identity: the key changes with an input file's content, the tokenizer or a
data setting, not with the number of workers; a second job with the same inputs prepares nothing and
is pointed at the same dataset; the pretrain stage refuses to run without a prepared dataset."""

from __future__ import annotations

import json

import pytest

from dhad_api.jobs import Job
from dhad_trainer.data import prepare as pipeline
from dhad_trainer.data.readers import DataError
from dhad_trainer.stages import prepare as stage
from dhad_trainer.storage.routing import RoutingStore
from tests.support.arabic_corpus import byte_level_tokenizer, documents, write_jsonl
from tests.unit.test_launcher import job_doc


@pytest.fixture
def setup(tmp_path, monkeypatch):
    docs, _ = documents(80, seed=2)
    corpus = write_jsonl(tmp_path / "corpus" / "a.jsonl", docs)
    tok = byte_level_tokenizer(tmp_path / "tok", docs)
    monkeypatch.setenv("DHAD_PREPARED_ROOT", str(tmp_path / "prepared"))
    return tmp_path, corpus, tok


def job(tmp_path, corpus, tok, uid: str, **data) -> Job:
    doc = job_doc(str(tok), str(corpus), root=str(tmp_path / "jobs" / uid), uid=uid)
    doc["spec"]["data"].update({"sources": [{"uri": str(corpus)}], **data})
    return Job.model_validate(doc)


def key_of(j: Job, tok) -> str:
    spec = j.typed_spec()
    plan = pipeline.Plan.make(spec.data, RoutingStore())
    return stage.dataset_key(plan, stage.tokenizer_identity(tok), stage.vocabulary_settings(spec, RoutingStore()))


def test_the_key_follows_inputs_tokenizer_and_settings_not_workers(setup):
    tmp_path, corpus, tok = setup
    base = key_of(job(tmp_path, corpus, tok, "a"), tok)
    assert key_of(job(tmp_path, corpus, tok, "b", workers=7), tok) == base
    assert key_of(job(tmp_path, corpus, tok, "c", filters={"minChars": 21}), tok) != base
    other_tok = byte_level_tokenizer(tmp_path / "tok2", documents(20, seed=9)[0], vocab_size=400)
    assert key_of(job(tmp_path, corpus, other_tok, "d"), other_tok) != base
    with corpus.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "نص جديد " * 20}, ensure_ascii=False) + "\n")
    assert key_of(job(tmp_path, corpus, tok, "e"), tok) != base  # same path, new content


def test_a_second_job_with_the_same_inputs_prepares_nothing(setup, caplog):
    tmp_path, corpus, tok = setup
    first = job(tmp_path, corpus, tok, "a")
    stats = stage.run_pod(first, str(tmp_path / "jobs" / "a"), 0, 1, tmp_path / "work-a")
    pointer = json.loads((tmp_path / "jobs" / "a" / "prepare" / "prepared.json").read_text())
    passes = (tmp_path / "prepared" / pointer["key"] / "passes.json").read_text()
    second = job(tmp_path, corpus, tok, "b", workers=3)
    again = stage.run_pod(second, str(tmp_path / "jobs" / "b"), 0, 3, tmp_path / "work-b")
    assert again == stats and json.loads((tmp_path / "jobs" / "b" / "prepare" / "prepared.json").read_text()) == pointer
    assert (tmp_path / "prepared" / pointer["key"] / "passes.json").read_text() == passes  # no item ran again
    assert not (tmp_path / "work-b" / "scratch" / "scan").exists()


def test_training_never_prepares(setup):
    from dhad_trainer.stages.base import StageRun
    from dhad_trainer.stages.pretrain import prepared_dataset

    tmp_path, corpus, tok = setup
    j = job(tmp_path, corpus, tok, "a")
    run = StageRun(spec=j.typed_spec(), stage="pretrain", model_dir=tok, work_dir=tmp_path / "w", output_dir=tmp_path / "o",
                   root=str(tmp_path / "jobs" / "a"))
    with pytest.raises(DataError, match="the prepare sub-stage has not finished"):
        prepared_dataset(run)
