"""The model card (huggingface_hub ModelCard): what it inherits from a Llama-derived base, its lineage,
a usage snippet that runs on the model it describes, an EvalJob's model-index results, and the
`output.hub` push against a local Hub stand-in that records the upload calls."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from huggingface_hub import ModelCard, ModelCardData, constants

from dhad_api.jobs import EvalJobSpec, SFTJobSpec
from dhad_trainer.local.tiny import init_tiny_model
from dhad_trainer.storage import hub, models
from tests.support.hub_server import HubServer

STORAGE = {"bucket": "dhad-test"}


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory):
    """A tiny model whose card says what a Llama 2 derivative's does (license llama2, a Hub base)."""
    folder = init_tiny_model(tmp_path_factory.mktemp("card") / "base")
    data = ModelCardData(language=["en"], license="llama2", base_model="meta-llama/Llama-2-7b-hf",
                         license_link="https://ai.meta.com/llama/license/")
    ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n# base\n").save(folder / "README.md")
    return folder


def sft_spec(**output) -> SFTJobSpec:
    return SFTJobSpec.model_validate({
        "model": {"uri": "s3://dhad-test/models/base"}, "storage": STORAGE,
        "data": [{"uri": "hf://FreedomIntelligence/Arabic-Alpaca"}, {"uri": "s3://dhad-test/data/native.jsonl"}],
        "training": {"maxSteps": 5, "learningRate": 2e-5, "sequenceLength": 128}, "output": output,
    })


def card_for(spec, base_dir, **extra) -> ModelCard:
    return models.build_model_card(
        kind="SFTJob", stage="sft", spec=spec, spec_dict=spec.to_json_dict(), inputs={"model": "ab12"},
        base_uri="s3://dhad-test/models/base", base_dir=base_dir, job="team/acegpt-sft",
        output_uri="s3://dhad-test/dhad/team/acegpt-sft-u1/sft/model", **extra)


def test_card_inherits_license_and_hub_base_from_a_llama_derived_base(llama_base):
    card = card_for(sft_spec(), llama_base)
    data = card.data
    assert data.language == ["ar"] and data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert data.license == "llama2" and data.license_link == "https://ai.meta.com/llama/license/"
    assert data.base_model == "meta-llama/Llama-2-7b-hf"  # the base is in S3: its own card names the Hub model
    assert data.datasets == ["FreedomIntelligence/Arabic-Alpaca"]  # s3:// data has no Hub id; it is in the body
    lineage = data.dhad["lineage"]
    assert [(s["job"], s["stage"], s["inputs"]) for s in lineage] == [("team/acegpt-sft", "sft", {"model": "ab12"})]
    text = str(card)
    assert "s3://dhad-test/data/native.jsonl" in text and "| learning rate | 2e-05 |" in text
    reloaded = ModelCard(text)  # what the Hub parses
    assert reloaded.data.license == "llama2" and reloaded.data.dhad["stage"] == "sft"


def test_spec_license_wins_and_a_chain_keeps_its_lineage(llama_base, tmp_path):
    first = card_for(sft_spec(), llama_base)
    (tmp_path / "README.md").write_text(str(first))
    second = models.build_model_card(
        kind="SFTJob", stage="sft", spec=sft_spec(license="apache-2.0"), spec_dict={}, inputs={}, base_uri="s3://x/y",
        base_dir=tmp_path, job="team/second", output_uri="s3://x/z")
    assert second.data.license == "apache-2.0" and second.data.license_link is None
    assert second.data.base_model == "meta-llama/Llama-2-7b-hf"
    assert [s["job"] for s in second.data.dhad["lineage"]] == ["team/acegpt-sft", "team/second"]


def test_usage_snippet_runs_on_the_model_it_describes(llama_base):
    card = card_for(sft_spec(), llama_base)
    code = str(card).split("```python\n", 1)[1].split("```", 1)[0]
    assert 'model_id = "path/to/this/folder"' in code
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code.replace("path/to/this/folder", str(llama_base)), {})  # noqa: S102 - the card's own snippet
    assert out.getvalue().endswith("\n")  # it loaded, generated and reached its print


def test_eval_job_adds_model_index_results_to_the_evaluated_models_card(llama_base, tmp_path):
    (tmp_path / "README.md").write_text(str(card_for(sft_spec(), llama_base)))
    spec = EvalJobSpec.model_validate({"model": {"uri": "s3://dhad-test/m"}, "storage": STORAGE,
                                       "evaluation": {"suites": ["acva", "arabic-mmlu"]}})
    scores = {"acva/generate": 0.6125, "arabic-mmlu/generate": 0.3}
    card = models.build_model_card(kind="EvalJob", stage="eval", spec=spec, spec_dict=spec.to_json_dict(), inputs={},
                                   base_uri="s3://dhad-test/m", base_dir=tmp_path, job="team/eval-1", output_uri=None,
                                   scores=scores)
    reloaded = ModelCard(str(card))
    results = {(r.dataset_type, r.metric_type): r.metric_value for r in reloaded.data.eval_results}
    assert results == {("FreedomIntelligence/ACVA-Arabic-Cultural-Value-Alignment", "accuracy"): 0.6125,
                       ("FreedomIntelligence/ArabicMMLU", "accuracy"): 0.3}
    assert reloaded.data.license == "llama2" and [s["job"] for s in reloaded.data.dhad["lineage"]] == ["team/acegpt-sft"]
    assert "| ACVA | generate | 0.6125 |" in str(card)
    again = models.build_model_card(kind="EvalJob", stage="eval", spec=spec, spec_dict={}, inputs={}, base_uri="s3://dhad-test/m",
                                    base_dir=_saved(tmp_path / "again", card), job="team/eval-2", output_uri=None,
                                    scores={"acva/generate": 0.7})
    assert sorted(r.metric_value for r in again.data.eval_results) == [0.3, 0.7]  # re-scored ACVA replaced


def _saved(folder, card):
    folder.mkdir()
    card.save(folder / "README.md")
    return folder


@pytest.fixture
def hub_env(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with HubServer(token="hf_test_write_token") as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def test_push_uploads_the_model_and_card_to_a_private_repo(llama_base, tmp_path, hub_env, monkeypatch):
    monkeypatch.setenv("DHAD_HUB_TOKEN", "hf_test_write_token")
    spec = sft_spec(hub={"repoId": "dhad-org/acegpt-tiny-sft", "tokenSecretRef": {"name": "hf", "key": "token"}})
    folder = tmp_path / "model"
    folder.mkdir()
    for path in llama_base.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    card_for(spec, llama_base).save(folder / "README.md")
    (folder / "MANIFEST.json").write_text("{}")
    assert hub.check_token(spec.output.hub) == "dhad-bot"
    url = hub.push(folder, spec.output.hub, "Dhad SFTJob acegpt-sft: sft")
    repo = hub_env.repos["dhad-org/acegpt-tiny-sft"]
    assert repo.private is True and url.startswith(f"{hub_env.url}/dhad-org/acegpt-tiny-sft/commit/")
    expected = {p.name for p in llama_base.iterdir()} | {"README.md"}
    assert set(repo.files) == expected  # MANIFEST.json stays in S3
    assert repo.files["model.safetensors"] == (llama_base / "model.safetensors").read_bytes()  # through LFS
    assert ModelCard(repo.files["README.md"].decode()).data.model_name == "acegpt-tiny-sft"
    assert "usage" not in json.dumps(repo.commits[0]["header"]) and repo.commits[0]["header"]["summary"].startswith("Dhad SFTJob")
    methods = [(m, p) for m, p in hub_env.calls]
    assert ("POST", "/api/repos/create") in methods
    assert any(p.endswith(".git/info/lfs/objects/batch") for _, p in methods) and any(m == "PUT" for m, _ in methods)
    assert methods[-1] == ("POST", "/api/models/dhad-org/acegpt-tiny-sft/commit/main")


def test_a_refused_token_is_named_and_never_shown(hub_env, monkeypatch):
    monkeypatch.setenv("DHAD_HUB_TOKEN", "hf_wrong_secret_value")
    target = sft_spec(hub={"repoId": "dhad-org/x", "tokenSecretRef": {"name": "hf", "key": "token"}}).output.hub
    with pytest.raises(hub.HubError) as error:
        hub.check_token(target)
    assert "output.hub.tokenSecretRef" in str(error.value) and "hf_wrong_secret_value" not in str(error.value)
    monkeypatch.delenv("DHAD_HUB_TOKEN")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(hub.HubError, match="DHAD_HUB_TOKEN is unset"):
        hub.check_token(target)
