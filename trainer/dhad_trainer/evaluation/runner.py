"""`ModelRunner` on a transformers causal LM: batched greedy generation and batched log-likelihood.

Log-likelihood is what makes the `loglikelihood` method cheap: one forward pass scores every choice,
where generation needs one pass per new token, and one-token choices sharing a context share one row.
Rows are left-padded with explicit position ids, so all continuations end at the last position and
only those logits are computed (`logits_to_keep`); rows are sorted by length so a batch pads little.
Context and context+continuation are tokenized separately and the continuation is whatever follows
their longest common token prefix, so a BPE merge across the boundary (the context's last characters
joined to the continuation's first) is scored as part of the continuation instead of being lost or
double counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class HFModelRunner:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 16,
        max_length: int | None = None,
        chat_template: bool = False,
    ) -> None:
        self.model, self.tok = model.eval(), tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or int(getattr(model.config, "max_position_embeddings", 4096))
        self.chat_template = chat_template
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token  # generation needs some pad id; masked out anyway

    @classmethod
    def from_pretrained(
        cls, path: str, *, dtype: str = "auto", device: str | None = None, **kw: Any
    ) -> HFModelRunner:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        model.to(torch.device(device))  # type: ignore[arg-type]  # transformers types .to oddly
        return cls(model, AutoTokenizer.from_pretrained(path), **kw)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _wrap(self, prompt: str) -> str:
        if not self.chat_template:
            return prompt
        return self.tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )

    def _encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=not self.chat_template)["input_ids"])

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(x) for x in self.tok(texts, add_special_tokens=not self.chat_template)["input_ids"]]

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
    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy continuations (new text only), in the order of `prompts`."""
        budget = max(self.max_length - max_new_tokens, 1)
        encoded = [ids[-budget:] for ids in self._encode_batch([self._wrap(p) for p in prompts])]
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        out: list[str] = [""] * len(prompts)
        for b in range(0, len(order), self.batch_size):
            batch = order[b : b + self.batch_size]
            ids, mask, _ = self._left_pad([encoded[i] for i in batch])
            gen = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.tok.pad_token_id,
            )
            texts = self.tok.batch_decode(gen[:, ids.shape[1] :], skip_special_tokens=True)
            for i, text in zip(batch, texts, strict=True):
                out[i] = text
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

    @torch.inference_mode()
    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[float]:
        """Sum of log P(continuation tokens | context) per (context, continuation) pair."""
        # A row is token ids plus the requests it answers: (index, None) scores the row's own last n
        # tokens; (index, token) reads a one-token continuation off the row's final position, so the
        # choices of one question ("A".."D", "نعم"/"لا") share a single row of their common context.
        rows: dict[tuple[int, ...], list[tuple[int, int | None, int]]] = {}
        contexts = list(dict.fromkeys(self._wrap(c) for c, _ in requests))  # 4 choices share one context
        encoded = dict(zip(contexts, self._encode_batch(contexts), strict=True))
        fulls = self._encode_batch([self._wrap(c) + x for c, x in requests])
        for i, (ctx, _) in enumerate(requests):
            full, start = self._align(encoded[self._wrap(ctx)], fulls[i])
            if len(full) - start == 1:
                rows.setdefault(tuple(full[:start]), []).append((i, full[start], 0))
            else:
                rows.setdefault((-1 - i, *full), []).append((i, None, len(full) - start))  # unique key
        keys = sorted(rows, key=lambda k: -len(k))
        out = [0.0] * len(requests)
        for b in range(0, len(keys), self.batch_size):
            batch = keys[b : b + self.batch_size]
            ids, mask, pos = self._left_pad([list(k[1:] if k and k[0] < 0 else k) for k in batch])
            keep = max(n + 1 for k in batch for _, _, n in rows[k])
            logits = self.model(
                input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep
            ).logits
            for r, key in enumerate(batch):
                last = torch.log_softmax(logits[r, -1].float(), -1)
                for i, token, n in rows[key]:
                    if token is not None:
                        out[i] = float(last[token])
                    else:  # position t predicts token t + 1
                        lp = torch.log_softmax(logits[r, -(n + 1) : -1].float(), -1)
                        out[i] = float(lp.gather(-1, ids[r, -n:].unsqueeze(-1)).sum())
        return out
