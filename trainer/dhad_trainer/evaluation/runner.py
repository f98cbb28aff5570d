"""`ModelRunner`s: a transformers causal LM (batched generation and log-likelihood), and vLLM for
generation on GPUs when it is installed and the spec asks for it.

Log-likelihood is what makes the `loglikelihood` method cheap, and three things keep it so:
- one row per shared context: requests whose token ids agree up to their last token share one row,
  and each reads its last token's log-probability off the row's final position (the four letters of a
  question are one row even when " A" is two tokens, since " " then "A".."D" differ only at the end);
- a shared prefix computed once: rows that begin with the same long run of tokens (a subject's
  few-shot examples) are grouped; the prefix goes through the model once per group, and only the rows'
  own tokens are run on top of its KV cache. On a CPU the rows attend to the prefix and to their own
  tokens in two parts merged exactly (`shared_prefix_attention`), so the prefix is neither copied per
  row nor masked; elsewhere its cache is copied to each batch of the group's rows;
- rows are left-padded with explicit position ids, so every continuation ends at the last position
  and only those logits are computed (`logits_to_keep`); rows are sorted by length and a batch ends
  early rather than pad more than PAD_SLACK of its tokens (question lengths are long-tailed: fixed
  batches of 16 padded 35% of a 5-shot MMLU run's question tokens).
Context and context+continuation are tokenized separately and the continuation is whatever follows
their longest common token prefix, so a BPE merge across the boundary (the context's last characters
joined to the continuation's first) is scored as part of the continuation instead of being lost or
double counted.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

Prompt = str | list[dict[str, str]]  # plain text, or chat messages rendered with the tokenizer's template
MIN_SHARED_PREFIX = 32  # tokens; below this a prefix pass costs more than it saves
WINDOW_CHARS = 64  # characters of context tokenized with each continuation (see _pairs)
SYNC_TOKENS = 8
PAD_SLACK = 0.15  # padding a log-likelihood batch may add, as a share of its real tokens


def padded_batches(lengths: Sequence[int], batch_size: int, slack: float = PAD_SLACK) -> list[range]:
    """Consecutive batches of rows sorted longest first: at most `batch_size` rows, and a batch ends
    before a row that would make its padding exceed `slack` of its tokens (a batch is as wide as its
    first row)."""
    batches: list[range] = []
    start = 0
    while start < len(lengths):
        end, real = start + 1, lengths[start]
        while end < len(lengths) and end - start < batch_size \
                and (end - start + 1) * lengths[start] <= (1 + slack) * (real + lengths[end]):
            real += lengths[end]
            end += 1
        batches.append(range(start, end))
        start = end
    return batches


@dataclass
class _Row:
    ids: list[int]
    asks: list[tuple[int, int, int]] = field(default_factory=list)  # (request, last token, tokens inside)

    @property
    def keep(self) -> int:
        """Positions whose logits are needed: the final one, plus one per continuation token in the row."""
        return max(n for _, _, n in self.asks) + 1


class TokenizedPrompts:
    """How prompts become token ids, shared by the transformers and vLLM runners so both score the
    same tokens: chat templates, special tokens, truncation, and the context/continuation split."""

    def __init__(self, tokenizer: Any, *, chat_template: bool, max_length: int) -> None:
        self.tok, self.chat_template, self.max_length = tokenizer, chat_template, max_length
        self.whole_encodes = 0  # continuations tokenized with their whole context (see _pairs)

    def _wrap(self, prompt: Prompt) -> str:
        if isinstance(prompt, list):  # chat messages: the template when there is one
            if self.tok.chat_template:
                return self.tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            return "\n\n".join(m["content"] for m in prompt) + "\n\n"
        if not self.chat_template:
            return prompt
        return self.tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )

    def _special(self, prompt: Prompt) -> bool:
        """Whether the tokenizer adds its special tokens: not to text a chat template rendered."""
        templated = isinstance(prompt, list) and bool(self.tok.chat_template)
        return not (self.chat_template or templated)

    def _encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=not self.chat_template)["input_ids"])

    def _encode_batch(self, texts: list[str], special: bool | None = None) -> list[list[int]]:
        if not texts:
            return []
        add = (not self.chat_template) if special is None else special
        return [list(x) for x in self.tok(texts, add_special_tokens=add)["input_ids"]]

    def _prompt_ids(self, prompts: Sequence[Prompt], budget: int) -> list[list[int]]:
        """Token ids of each prompt, keeping its last `budget` tokens."""
        out: list[list[int]] = [[] for _ in prompts]
        for special in (True, False):  # plain and templated prompts tokenize differently
            picked = [i for i, p in enumerate(prompts) if self._special(p) == special]
            for i, ids in zip(picked, self._encode_batch([self._wrap(prompts[i]) for i in picked], special),
                              strict=True):
                out[i] = ids[-budget:]
        return out

    def _split(self, context: str, continuation: str) -> tuple[list[int], int]:
        """Token ids of context+continuation and where the continuation's tokens start."""
        wrapped = self._wrap(context)
        return self._align(self._encode(wrapped), self._encode(wrapped + continuation))

    def _align(self, ctx: list[int], full: list[int]) -> tuple[list[int], int]:
        if full[: len(ctx)] == ctx:  # the usual case: no merge across the boundary
            common = len(ctx)
        else:
            common = 0
            while common < min(len(ctx), len(full)) and ctx[common] == full[common]:
                common += 1
        common = min(common, len(full) - 1)
        if common == 0:  # nothing to condition the first token on: start from a document boundary
            full, common = [self.tok.bos_token_id or self.tok.eos_token_id, *full], 1
        if len(full) > self.max_length:  # drop the oldest context, never the continuation
            cut = min(len(full) - self.max_length, common - 1)
            full, common = full[cut:], common - cut
        return full, common


class HFModelRunner(TokenizedPrompts):
    backend = "transformers"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 16,
        max_length: int | None = None,
        chat_template: bool = False,
        prefix_cache: bool = True,
        split_attention: bool = True,
    ) -> None:
        length = max_length or int(getattr(model.config, "max_position_embeddings", 4096))
        super().__init__(tokenizer, chat_template=chat_template, max_length=length)
        self.model = model.eval()
        self.batch_size = batch_size
        self.prefix_cache = prefix_cache and _full_attention_only(model)
        self.split_attention = split_attention and self.prefix_cache and self.device.type == "cpu" \
            and _attention_modules_take_kwargs(model)
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token  # generation needs some pad id; masked out anyway
        self.stats = {"forwards": 0, "prefix_tokens": 0, "row_tokens": 0, "shared_prefix_batches": 0}

    @classmethod
    def from_pretrained(
        cls, path: str, *, dtype: str = "auto", device: str | None = None, **kw: Any
    ) -> HFModelRunner:
        """On `device` (default: cuda when there is one) in `dtype` ("auto" keeps the checkpoint's dtype;
        on a CPU "auto" loads float32, which is what the CPU computes fast)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype: Any = dtype if dtype != "auto" else (torch.float32 if device == "cpu" else "auto")
        if isinstance(torch_dtype, str) and torch_dtype != "auto":
            torch_dtype = getattr(torch, torch_dtype)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        model.to(torch.device(device))  # type: ignore[arg-type]  # transformers types .to oddly
        return cls(model, AutoTokenizer.from_pretrained(path), **kw)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _left_pad(self, rows: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return ids.to(self.device), mask.to(self.device), positions.to(self.device)

    @torch.inference_mode()
    def generate(
        self, prompts: Sequence[Prompt], max_new_tokens: int, *, temperature: float = 0.0, seed: int | None = None
    ) -> list[str]:
        """Continuations (new text only), in the order of `prompts`: greedy, or sampled at `temperature`
        with a seeded generator. A prompt is text or chat messages."""
        ids_of = self._prompt_ids(prompts, max(self.max_length - max_new_tokens, 1))
        order = sorted(range(len(prompts)), key=lambda i: -len(ids_of[i]))
        out: list[str] = [""] * len(prompts)
        sampling: dict[str, Any] = {"do_sample": False}
        if temperature > 0:
            sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
            torch.manual_seed(0 if seed is None else seed)
        for b in range(0, len(order), self.batch_size):
            batch = order[b : b + self.batch_size]
            ids, mask, _ = self._left_pad([ids_of[i] for i in batch])
            gen = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                pad_token_id=self.tok.pad_token_id,
                **sampling,
            )
            texts = self.tok.batch_decode(gen[:, ids.shape[1] :], skip_special_tokens=True)
            for i, text in zip(batch, texts, strict=True):
                out[i] = text
        return out

    def _pairs(self, requests: list[tuple[str, str]]) -> list[tuple[list[int], int]]:
        """(context+continuation ids, where the continuation starts) per request, as `_split` gives them,
        tokenizing each distinct context once and each continuation only with the context's last
        WINDOW_CHARS characters. A merge across the boundary reaches a few characters back, so past its
        first tokens the window tokenizes as the context does; that is checked per context (at least
        SYNC_TOKENS agreeing tokens, and the continuation changing nothing before them), and a context
        where it fails is encoded whole with each continuation."""
        wrapped = [self._wrap(c) for c, _ in requests]
        contexts = list(dict.fromkeys(wrapped))
        ctx_ids = dict(zip(contexts, self._encode_batch(contexts), strict=True))
        windows = {c: c[-WINDOW_CHARS:] for c in contexts}
        win_ids = dict(zip(contexts, self._encode_batch([windows[c] for c in contexts], special=False), strict=True))
        tails = self._encode_batch([windows[w] + cont for w, (_, cont) in zip(wrapped, requests, strict=True)],
                                   special=False)
        out: list[tuple[list[int], int]] = []
        for w, (_, cont), tail in zip(wrapped, requests, tails, strict=True):
            ctx, win = ctx_ids[w], win_ids[w]
            synced = len(win) - 2  # the window's first tokens may differ (a cut word, a dummy prefix)
            common = _common_prefix(win, tail, len(win))
            if len(w) > WINDOW_CHARS and synced >= SYNC_TOKENS and ctx[-synced:] == win[-synced:] \
                    and common >= len(win) - synced:
                full = ctx[: len(ctx) - (len(win) - common)] + tail[common:]
            else:
                full = self._encode(w + cont)
                self.whole_encodes += 1
            out.append(self._align(ctx, full))
        return out

    def _rows(self, requests: list[tuple[str, str]]) -> list[_Row]:
        """One row per distinct "everything but the last token"; see the module docstring."""
        rows: dict[tuple[int, ...], _Row] = {}
        for i, (full, start) in enumerate(self._pairs(requests)):
            key = tuple(full[:-1])
            rows.setdefault(key, _Row(list(key))).asks.append((i, full[-1], len(full) - 1 - start))
        return list(rows.values())

    def _groups(self, rows: list[_Row]) -> list[tuple[int, list[_Row]]]:
        """(shared prefix length, rows): rows sorted by token ids, a group grown while the prefix its rows
        share stays at least MIN_SHARED_PREFIX long. A prefix never covers a position whose logits one
        of its rows needs; a group of one row (prefix 0) is run whole."""
        groups: list[tuple[int, list[_Row]]] = []
        for row in sorted(rows, key=lambda r: r.ids):
            if groups and self.prefix_cache:
                shared, members = groups[-1]
                common = min(_common_prefix(members[0].ids, row.ids, shared), len(row.ids) - row.keep)
                if common >= MIN_SHARED_PREFIX:
                    groups[-1] = (common, [*members, row])
                    continue
            groups.append((len(row.ids) - row.keep, [row]))
        return [(shared if len(members) > 1 else 0, members) for shared, members in groups]

    def _forward(self, ids, mask, pos, keep: int, cache=None, **kw: Any):
        self.stats["forwards"] += 1
        if cache is not None:
            kw[self._cache_kw] = cache
        return self.model(
            input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep, use_cache=cache is not None, **kw
        ).logits

    def _read(self, logits: torch.Tensor, ids: torch.Tensor, rows: Sequence[_Row], out: list[float]) -> None:
        """Each request's log-probability from its row's last `keep` positions."""
        for r, row in enumerate(rows):
            lp = torch.log_softmax(logits[r].float(), -1)  # (keep, vocab), the last one predicts the end
            for i, last, n in row.asks:
                total = float(lp[-1, last])
                if n:  # position t predicts token t + 1: the row's last n tokens are continuation
                    total += float(lp[-(n + 1) : -1].gather(-1, ids[r, -n:].unsqueeze(-1)).sum())
                out[i] = total

    @torch.inference_mode()
    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[float]:
        """Sum of log P(continuation tokens | context) per (context, continuation) pair."""
        from transformers import DynamicCache

        out = [0.0] * len(requests)
        groups = self._groups(self._rows(requests))
        plain = sorted((r for p, m in groups if p == 0 for r in m), key=lambda r: -len(r.ids))
        for span in padded_batches([len(r.ids) for r in plain], self.batch_size):
            batch = plain[span.start : span.stop]
            ids, mask, pos = self._left_pad([r.ids for r in batch])
            self.stats["row_tokens"] += int(mask.sum())
            self._read(self._forward(ids, mask, pos, max(r.keep for r in batch)), ids, batch, out)
        shared = sorted(((p, m) for p, m in groups if p > 0), key=lambda g: -g[0])
        for g in range(0, len(shared), self.batch_size):  # prefixes of several groups in one pass
            chunk = shared[g : g + self.batch_size]
            p_ids, p_mask, p_pos = self._left_pad([m[0].ids[:p] for p, m in chunk])
            self.stats["prefix_tokens"] += int(p_mask.sum())
            self.stats["forwards"] += 1
            prefix = self.model(input_ids=p_ids, attention_mask=p_mask, position_ids=p_pos, use_cache=True,
                                logits_to_keep=1)
            cache = getattr(prefix, "cache", None) or prefix.past_key_values
            layers = [(layer.keys, layer.values) for layer in cache.layers]
            lengths = p_mask.sum(-1)
            members = sorted(((k, row) for k, (_, m) in enumerate(chunk) for row in m),
                             key=lambda kr: -(len(kr[1].ids) - chunk[kr[0]][0]))
            widths = [len(row.ids) - chunk[k][0] for k, row in members]
            for span in padded_batches(widths, self.batch_size):
                batch = members[span.start : span.stop]
                which = torch.tensor([k for k, _ in batch], device=self.device)
                tails = [row.ids[chunk[k][0] :] for k, row in batch]
                ids, mask, pos = self._left_pad(tails)
                self.stats["row_tokens"] += int(mask.sum())
                pos = pos + lengths[which].unsqueeze(-1)
                keep = max(row.keep for _, row in batch)
                if self.split_attention:
                    prefixes = [k for k, _ in batch]
                    groups = [(torch.tensor([r for r, kk in enumerate(prefixes) if kk == k], device=self.device),
                               k, int(lengths[k])) for k in dict.fromkeys(prefixes)]
                    self.stats["shared_prefix_batches"] += 1
                    with _attention_implementation(self.model, SHARED_PREFIX_ATTENTION):
                        logits = self._forward(ids, None, pos, keep,
                                               dhad_shared_prefix=SharedPrefix(layers, groups, mask))
                else:
                    if len(set(prefixes := [k for k, _ in batch])) == 1:  # a view, no copy (DynamicCache copies it once)
                        one = prefixes[0]
                        data = [(k[one : one + 1].expand(len(batch), -1, -1, -1),
                                 v[one : one + 1].expand(len(batch), -1, -1, -1)) for k, v in layers]
                    else:
                        data = [(k[which], v[which]) for k, v in layers]
                    full_mask = torch.cat([p_mask[which], mask], dim=-1)
                    logits = self._forward(ids, full_mask, pos, keep, DynamicCache(ddp_cache_data=data))
                self._read(logits, ids, [row for _, row in batch], out)
        return out


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _full_attention_only(model: Any) -> bool:
    """Prefix caching copies plain KV tensors; models with sliding-window or other cache layers opt out."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "sliding_window", None):
        return False
    types = getattr(config, "layer_types", None)
    return not types or all(t == "full_attention" for t in types)


SHARED_PREFIX_ATTENTION = "dhad_shared_prefix"


@dataclass
class SharedPrefix:
    """What shared-prefix attention reads besides the rows' own tokens: per layer, the keys and values of
    a pass over several left-padded prefixes, (prefixes, kv heads, positions, head dim); per prefix, the
    rows that follow it and its length; and the rows' left-padded mask, (rows, tokens)."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    groups: list[tuple[torch.Tensor, int, int]]  # (row indices, prefix index, prefix length)
    mask: torch.Tensor


def shared_prefix_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                            dhad_shared_prefix: SharedPrefix | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention of rows over the prefix each follows, without a copy of a prefix per row or a mask over it.
    Every real token of a row sees its whole prefix: that part is one pass of all the queries of a
    prefix's rows over the prefix's keys. Its own row's tokens it sees causally. Both parts come with
    their log-sum-exps, and softmax over the union is their weighted sum, exact up to rounding:
    out = e^(lse_p - lse) out_p + e^(lse_t - lse) out_t, lse = log(e^lse_p + e^lse_t).
    The CPU flash kernel returns the log-sum-exp (public SDPA does not), hence CPU only."""
    assert dhad_shared_prefix is not None, "shared-prefix attention needs dhad_shared_prefix"
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    prefix_keys, prefix_values = dhad_shared_prefix.layers[module.layer_idx]
    rows, heads, tokens, dim = query.shape
    groups = heads // key.shape[1]  # grouped-query attention: each kv head serves `groups` query heads
    if groups > 1:
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    out_p = torch.empty_like(query)
    lse_p = torch.empty(rows, heads, tokens, dtype=torch.float32, device=query.device)
    for members, index, length in dhad_shared_prefix.groups:
        keys, values = prefix_keys[index : index + 1, :, -length:], prefix_values[index : index + 1, :, -length:]
        if groups > 1:
            keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
        n = len(members)
        queries = query[members].transpose(0, 1).reshape(1, heads, n * tokens, dim)
        out, lse = flash(queries, keys, values, scale=scaling)
        out_p[members] = out.reshape(heads, n, tokens, dim).transpose(0, 1)
        lse_p[members] = lse.reshape(heads, n, tokens).transpose(0, 1).float()
    real = dhad_shared_prefix.mask.bool()
    seen = torch.ones(tokens, tokens, dtype=torch.bool, device=query.device).tril() & real[:, None, :]
    seen |= torch.eye(tokens, dtype=torch.bool, device=query.device)  # a padding query sees itself: no empty row
    bias = torch.zeros(seen.shape, dtype=query.dtype, device=query.device).masked_fill_(~seen, float("-inf"))
    out_t, lse_t = flash(query, key, value, attn_mask=bias.unsqueeze(1), scale=scaling)
    lse = torch.logaddexp(lse_p, lse_t.float())
    out = torch.exp(lse_p - lse).unsqueeze(-1) * out_p + torch.exp(lse_t - lse).unsqueeze(-1) * out_t
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def _attention_implementation(model: Any, name: str) -> Iterator[None]:
    """The model's attention layers run the registered `name` inside the block (they read it from the
    config at each call)."""
    from transformers import AttentionInterface

    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, shared_prefix_attention)
    saved, model.config._attn_implementation = model.config._attn_implementation, name
    try:
        yield
    finally:
        model.config._attn_implementation = saved


def _attention_modules_take_kwargs(model: Any) -> bool:
    """Shared-prefix attention reaches the attention function through the forward's **kwargs, and needs
    each attention module's layer index: transformers' own decoder models pass both."""
    modules = [m for n, m in model.named_modules() if n.endswith("self_attn")]
    return bool(modules) and all(isinstance(getattr(m, "layer_idx", None), int) for m in modules)


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


class VllmRunner(TokenizedPrompts):
    """vLLM's offline engine on GPUs: greedy (or sampled) generation, and log-likelihood from
    `prompt_logprobs` over our own token ids (the same alignment as HFModelRunner), so both runners
    score the same tokens. vLLM's prefix caching reuses a subject's few-shot prefix by itself."""

    backend = "vllm"

    def __init__(self, path: str, *, dtype: str = "auto", chat_template: bool = False,
                 max_length: int | None = None) -> None:
        from transformers import AutoTokenizer
        from vllm import LLM

        self.llm = LLM(model=str(path), dtype=dtype, enable_prefix_caching=True)
        config = getattr(getattr(self.llm, "llm_engine", None), "model_config", None)
        tok = AutoTokenizer.from_pretrained(path)
        length = max_length or int(getattr(config, "max_model_len", 0) or tok.model_max_length)
        super().__init__(tok, chat_template=chat_template, max_length=length)

    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int, *, temperature: float = 0.0,
                 seed: int | None = None) -> list[str]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, seed=seed)
        ids = self._prompt_ids(prompts, max(self.max_length - max_new_tokens, 1))
        outputs = self.llm.generate([{"prompt_token_ids": x} for x in ids], params, use_tqdm=False)
        return [o.outputs[0].text for o in outputs]

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[float]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        split = [self._split(ctx, cont) for ctx, cont in requests]
        outputs = self.llm.generate([{"prompt_token_ids": f} for f, _ in split], params, use_tqdm=False)
        out = []
        for (full, start), o in zip(split, outputs, strict=True):
            logprobs = o.prompt_logprobs  # per prompt token: {token id: Logprob}; None for the first
            out.append(sum(logprobs[t][full[t]].logprob for t in range(start, len(full))))
        return out

    def close(self) -> None:
        """Frees the GPU for the next model (vLLM holds its memory until the engine is gone)."""
        import gc

        del self.llm
        gc.collect()
        torch.cuda.empty_cache()
