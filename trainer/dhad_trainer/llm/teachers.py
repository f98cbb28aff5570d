"""Teacher backends for the respond stage: an OpenAI-compatible endpoint, transformers, or vLLM.

All three take (tag, messages) jobs and yield (tag, Answer) as answers arrive, so the stage journals
each paid answer at once. Setting `stop` makes a backend take no new work but still hand over what is
in flight: an answer the teacher already produced (and the endpoint billed) is never thrown away.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dhad_api.stages import Endpoint, Generation
from dhad_trainer.llm.client import EndpointClient
from dhad_trainer.llm.types import ChatRequest, ChatResult, EndpointConfig

log = logging.getLogger(__name__)

API_KEY_ENV = "DHAD_TEACHER_API_KEY"  # the operator fills it from respond.teacher.endpoint.apiKeySecretRef
Job = tuple[Any, list[dict[str, Any]]]


@dataclass
class Answer:
    """One request's outcome: n texts with their finish reasons, or an error with a short reason."""

    texts: list[str] = field(default_factory=list)
    finish_reasons: list[str | None] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 1
    error: str | None = None
    reason: str | None = None


def endpoint_config(endpoint: Endpoint, generation: Generation, **overrides: Any) -> EndpointConfig:
    """The spec's Endpoint as the client's config; `overrides` is for tests (short backoff) and prices."""
    kw: dict[str, Any] = dict(
        base_url=endpoint.base_url, model=endpoint.model,
        api_key_env=API_KEY_ENV if endpoint.api_key_secret_ref else None,
        max_concurrency=endpoint.max_concurrency, requests_per_minute=endpoint.requests_per_minute,
        tokens_per_minute=endpoint.tokens_per_minute, max_retries=endpoint.max_retries,
        timeout_s=float(endpoint.timeout_seconds), default_max_tokens=generation.max_new_tokens,
    )
    kw.update(overrides)
    return EndpointConfig(**kw)


class EndpointTeacher:
    """Keeps `max_concurrency` requests in flight through the shared EndpointClient."""

    backend = "endpoint"

    def __init__(self, config: EndpointConfig, generation: Generation, n: int) -> None:
        self.client = EndpointClient(config)
        self.name = config.model
        self.generation, self.n = generation, n

    def _request(self, messages: list[dict[str, Any]]) -> ChatRequest:
        g = self.generation
        return ChatRequest(messages=messages, max_tokens=g.max_new_tokens, temperature=g.temperature,
                           top_p=g.top_p, n=self.n)

    def generate(self, jobs: list[Job], stop: threading.Event) -> Iterator[tuple[Any, Answer]]:
        width = self.client.config.max_concurrency
        todo = iter(jobs)
        with ThreadPoolExecutor(width, thread_name_prefix="dhad-teacher") as pool:
            running: dict[Future[ChatResult], Any] = {}
            while True:
                while not stop.is_set() and len(running) < width and (job := next(todo, None)) is not None:
                    running[pool.submit(self.client.complete, self._request(job[1]))] = job[0]
                if not running:
                    return
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    yield running.pop(future), _answer(future.result())


def _answer(r: ChatResult) -> Answer:
    usage = r.usage
    return Answer(list(r.texts), list(r.finish_reasons), usage.prompt_tokens if usage else 0,
                  usage.completion_tokens if usage else 0, r.attempts, r.error, r.reason)


class TransformersTeacher:
    """Batched `generate` with left padding; finish_reason is "length" when no end token came."""

    backend = "transformers"

    def __init__(self, path: Path, name: str, generation: Generation, n: int, *, device: str = "cpu",
                 dtype: str = "auto", batch_size: int = 8) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from dhad_trainer.data.chat import load_chat_template

        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if not self.tokenizer.chat_template:
            self.tokenizer.chat_template = load_chat_template()
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()
        eos = self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self.name, self.generation, self.n = name, generation, n
        self.device, self.batch_size = device, batch_size

    def generate(self, jobs: list[Job], stop: threading.Event) -> Iterator[tuple[Any, Answer]]:
        import torch

        g, tok = self.generation, self.tokenizer
        sampling = dict(do_sample=True, temperature=g.temperature, top_p=g.top_p) if g.temperature > 0 else {}
        for start in range(0, len(jobs), self.batch_size):
            if stop.is_set():
                return
            batch = jobs[start:start + self.batch_size]
            texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for _, m in batch]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            with torch.no_grad():
                out = self.model.generate(**enc, max_new_tokens=g.max_new_tokens, num_return_sequences=self.n,
                                          pad_token_id=tok.pad_token_id, **sampling)
            new = out[:, enc["input_ids"].shape[1]:].tolist()
            for i, (tag, _) in enumerate(batch):
                answer = Answer(prompt_tokens=int(enc["attention_mask"][i].sum()))
                for ids in new[i * self.n:(i + 1) * self.n]:
                    end = next((k for k, t in enumerate(ids) if t in self.eos), None)
                    kept = ids if end is None else ids[:end]
                    answer.texts.append(tok.decode(kept, skip_special_tokens=True).strip())
                    answer.finish_reasons.append("length" if end is None else "stop")
                    answer.completion_tokens += len(kept) + (end is not None)
                yield tag, answer


class VllmTeacher:
    """vLLM's offline `LLM.chat` on GPUs: one call per batch so answers are journaled as they come."""

    backend = "vllm"

    def __init__(self, path: Path, name: str, generation: Generation, n: int, batch_size: int = 256) -> None:
        from vllm import LLM, SamplingParams

        self.llm = LLM(model=str(path))
        self.params = SamplingParams(n=n, temperature=generation.temperature, top_p=generation.top_p,
                                     max_tokens=generation.max_new_tokens)
        self.name, self.batch_size = name, batch_size

    def generate(self, jobs: list[Job], stop: threading.Event) -> Iterator[tuple[Any, Answer]]:
        for start in range(0, len(jobs), self.batch_size):
            if stop.is_set():
                return
            batch = jobs[start:start + self.batch_size]
            outputs = self.llm.chat([m for _, m in batch], self.params, use_tqdm=False)
            for (tag, _), out in zip(batch, outputs, strict=True):
                yield tag, Answer([c.text for c in out.outputs], [c.finish_reason for c in out.outputs],
                                  len(out.prompt_token_ids or []), sum(len(c.token_ids) for c in out.outputs))


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None
