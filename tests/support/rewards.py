"""Rewards that are easy to learn, for the tests that show a policy algorithm raises its reward.

`definite_article`: answers that use the Arabic definite article "ال" score higher, min(count, CAP)/CAP.
About a fifth of the tiny tokenizer's 2048 tokens contain it, so a random tiny policy already scores
about 0.25 with 8 new tokens and every rollout has signal; a policy that writes only such tokens
scores 1. TRL's reward-function form: (prompts, completions, **kwargs) -> one float per completion.
"""

from __future__ import annotations

ARTICLE = "ال"
CAP = 8


def text_of(completion) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


def definite_article(prompts, completions, **kwargs) -> list[float]:
    return [min(text_of(c).count(ARTICLE), CAP) / CAP for c in completions]
