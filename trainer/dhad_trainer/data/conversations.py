"""SFT and prompt datasets: any of three record layouts in, one conversational layout out.

Every record becomes `{"messages": [{"role", "content"}, ...]}` so one chat template renders all of
them and the assistant mask (content + <|im_end|>) is the training target whatever the source was.
Broken records (bad JSON, missing or empty fields, unknown roles, no assistant turn) are counted per
dataset and skipped: one bad line must not kill a long job. Weighted mixing resamples each dataset to
`weight / sum(weights)` of the mix, which keeps the total record count of the inputs.
"""

from __future__ import annotations

import gzip
import io
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from dhad_api.data_prep import SourceFormat
from dhad_api.stages import SFTDataset, SFTSchema
from dhad_trainer.data.readers import DataError, ObjectStore, detect_format, resolve
from dhad_trainer.storage.local import LocalStore

ROLES = {"system": "system", "user": "user", "assistant": "assistant",
         "human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}  # + ShareGPT names

ARABIC_SYSTEM_PROMPT = "أنت مساعد ذكي مفيد وصادق، تجيب باللغة العربية الفصحى بوضوح واحترام."

Messages = list[dict[str, str]]


@dataclass
class DatasetCounts:
    """Per-dataset accounting, reported in the stage metrics."""

    uri: str
    records: int = 0
    bad: int = 0
    used: int = 0


def iter_records(uri: str, fmt: SourceFormat = SourceFormat.AUTO, store: ObjectStore | None = None) -> Iterator[Any]:
    """Every record (a dict, or None for a line that is not JSON) of a jsonl/parquet file set or hf:// dataset."""
    if uri.startswith("hf://"):
        yield from _hf_records(uri)
        return
    store = store or LocalStore()
    for path in resolve(uri, store):
        kind = detect_format(path) if fmt is SourceFormat.AUTO else fmt
        with store.open(path) as raw:
            f = gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw
            if kind is SourceFormat.PARQUET:
                import pyarrow.parquet as pq

                table = pq.ParquetFile(f if f.seekable() else io.BytesIO(f.read()))
                for batch in table.iter_batches(batch_size=1024):
                    yield from batch.to_pylist()
            elif kind is SourceFormat.JSONL:
                for line in f:
                    if line.strip():
                        yield _json_or_none(line)
            else:
                raise DataError(f"{path}: SFT data must be jsonl or parquet, not {kind}")


def _json_or_none(line: bytes) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return None


def _hf_records(uri: str) -> Iterator[Any]:
    """hf://org/name[@revision]: the train split through `datasets` (needs hub access or its cache)."""
    from datasets import load_dataset

    name, _, revision = uri.removeprefix("hf://").partition("@")
    yield from load_dataset(name, revision=revision or None, split="train")


def clean_messages(value: Any) -> Messages | None:
    """Validated role/content turns (ShareGPT from/value accepted), or None when the turns are unusable."""
    if not isinstance(value, list) or not value:
        return None
    out: Messages = []
    for turn in value:
        if not isinstance(turn, dict):
            return None
        role = ROLES.get(str(turn.get("role", turn.get("from", ""))).lower())
        content = turn.get("content", turn.get("value"))
        if role is None or not isinstance(content, str) or not content.strip():
            return None
        if role == "system" and out:
            return None  # a system turn only opens a conversation
        out.append({"role": role, "content": content})
    return out


def _text(record: dict, name: str) -> str | None:
    value = record.get(name)
    return value if isinstance(value, str) and value.strip() else None


def _instruction_text(record: dict, f) -> str | None:
    """An Alpaca-style user turn: the instruction, then the optional input after a blank line."""
    instruction, extra = _text(record, f.instruction), _text(record, f.input)
    if instruction is None:
        return None
    return f"{instruction}\n\n{extra}" if extra else instruction


def to_messages(record: Any, ds: SFTDataset) -> Messages | None:
    """One record in `ds.schema` as a conversation that ends with an assistant turn, or None if broken."""
    if not isinstance(record, dict):
        return None
    f = ds.fields
    if ds.schema_ is SFTSchema.MESSAGES:
        messages = clean_messages(record.get(f.messages))
    elif ds.schema_ is SFTSchema.INSTRUCTION_RESPONSE:
        user, response = _instruction_text(record, f), _text(record, f.response)
        if user is None or response is None:
            return None
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
    else:
        prompt, completion = record.get(f.prompt), record.get(f.completion)
        head = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        tail = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
        messages = clean_messages(head + tail) if isinstance(head, list) and isinstance(tail, list) else None
    if not messages or messages[-1]["role"] != "assistant":
        return None
    return messages


def to_prompt(record: Any, ds: SFTDataset) -> Messages | None:
    """The prompt part of a record (everything up to the last user turn); completions are optional here."""
    if not isinstance(record, dict):
        return None
    f = ds.fields
    if ds.schema_ is SFTSchema.MESSAGES:
        messages = clean_messages(record.get(f.messages))
    elif ds.schema_ is SFTSchema.INSTRUCTION_RESPONSE:
        user = _instruction_text(record, f)
        messages = [{"role": "user", "content": user}] if user else None
    else:
        prompt = record.get(f.prompt)
        messages = clean_messages([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt)
    while messages and messages[-1]["role"] != "user":
        messages = messages[:-1]
    return messages or None


def with_system_prompt(messages: Messages, system_prompt: str | None) -> Messages:
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def mix(groups: Sequence[list], weights: Sequence[float], seed: int) -> tuple[list, list[int]]:
    """Each group resampled to its weight's share of the total (whole copies, then a seeded sample)."""
    total, weight_sum, rng = sum(len(g) for g in groups), sum(weights), random.Random(seed)
    out, used = [], []
    for group, weight in zip(groups, weights, strict=True):
        want = round(total * weight / weight_sum)
        copies, rest = divmod(want, len(group))
        out.extend(group * copies + rng.sample(group, rest))
        used.append(want)
    rng.shuffle(out)
    return out, used


def load_sft_mix(
    datasets: Sequence[SFTDataset],
    store: ObjectStore | None = None,
    *,
    system_prompt: str | None = None,
    seed: int = 42,
):
    """(datasets.Dataset with a "messages" column, per-dataset counts). DataError if a dataset has no good record."""
    from datasets import Dataset

    groups, counts = [], []
    for ds in datasets:
        c = DatasetCounts(ds.uri)
        good = []
        for record in iter_records(ds.uri, ds.format, store):
            c.records += 1
            messages = to_messages(record, ds)
            if messages is None:
                c.bad += 1
            else:
                good.append(with_system_prompt(messages, system_prompt))
        if not good:
            raise DataError(f"{ds.uri}: no usable {ds.schema_.value} records ({c.bad} of {c.records} broken)")
        groups.append(good)
        counts.append(c)
    mixed, used = mix(groups, [ds.weight for ds in datasets], seed)
    for c, n in zip(counts, used, strict=True):
        c.used = n
    return Dataset.from_list([{"messages": m} for m in mixed]), [asdict(c) for c in counts]


def load_prompts(datasets: Sequence[SFTDataset], store: ObjectStore | None = None):
    """(unique prompts in first-seen order, per-dataset counts). Weights do not apply: each prompt is sampled once."""
    seen, prompts, counts = set(), [], []
    for ds in datasets:
        c = DatasetCounts(ds.uri)
        for record in iter_records(ds.uri, ds.format, store):
            c.records += 1
            prompt = to_prompt(record, ds)
            if prompt is None:
                c.bad += 1
                continue
            key = json.dumps(prompt, ensure_ascii=False, sort_keys=True)
            if key not in seen:
                seen.add(key)
                prompts.append(prompt)
                c.used += 1
        counts.append(asdict(c))
    if not prompts:
        raise DataError(f"no usable prompts in {', '.join(ds.uri for ds in datasets)}")
    return prompts, counts
