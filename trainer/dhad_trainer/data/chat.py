"""The ChatML conventions every stage shares: the special tokens and Dhad's template with generation
markers (assistant content + <|im_end|> is what assistant-only loss trains on), and where the assets live.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CHAT_TEMPLATE = ASSETS / "chatml.jinja"

ENDOFTEXT, IM_START, IM_END, PAD = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, PAD]  # ids 0..3, in this order


def load_chat_template() -> str:
    """The ChatML template whose generation block covers assistant content + <|im_end|>."""
    return CHAT_TEMPLATE.read_text(encoding="utf-8")
