"""Prompts for a teacher: SFTDataset records to the conversations to send, each with a cache key.

Records are read and cut to their prompt by `sft_data` (the SFT loader's own rules: prompt-completion
sends fields.prompt, instruction-response instruction + input, messages every turn up to the last user
turn), so the respond stage and SFT agree on what a record means. Broken records and repeated prompts
are counted, not sent: a repeat would pay twice for the same answer.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dhad_api.stages import SFTDataset
from dhad_trainer.data.conversations import iter_records, to_prompt, with_system_prompt
from dhad_trainer.data.readers import DataError


@dataclass
class Prompt:
    key: str  # hash of (messages, salt): the request's identity for caching
    messages: list[dict[str, str]]
    prompt_hash: str
    source: str  # dataset uri#record of its first occurrence


def content_hash(obj: Any) -> str:
    """Stable short hash of JSON-able data (key order and non-ASCII text do not matter)."""
    return hashlib.sha256(json.dumps(obj, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:32]


def load_prompts(datasets: list[SFTDataset], store_for: Callable[[str], Any], salt: dict[str, Any],
                 stats: Counter, system_prompt: str | None = None) -> list[Prompt]:
    """Unique prompts in dataset order, keyed by hash(messages, salt) where salt names model and settings.

    `system_prompt` is put first in conversations without a system turn. Counts go to `stats`:
    prompts (usable records), bad_records, duplicate_prompts. DataError if no prompt is usable.
    """
    prompts: dict[str, Prompt] = {}
    for ds in datasets:
        for i, record in enumerate(iter_records(ds.uri, ds.format, store_for(ds.uri))):
            msgs = to_prompt(record, ds)
            if msgs is None:
                stats["bad_records"] += 1
                continue
            stats["prompts"] += 1
            msgs = with_system_prompt(msgs, system_prompt)
            key = content_hash({"messages": msgs, **salt})
            if key in prompts:
                stats["duplicate_prompts"] += 1
            else:
                prompts[key] = Prompt(key, msgs, content_hash(msgs), f"{ds.uri}#{i}")
    if not prompts:
        raise DataError(f"prompts: no usable prompt in {[d.uri for d in datasets]}")
    return list(prompts.values())
