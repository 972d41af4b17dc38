"""Prompts wrapped in a chat template (Flux.2, Qwen-Image): where each prompt character's tokens land.

The text encoder reads ``template(prompt)``; the transformer gets that sequence's hidden states from
position ``drop`` on (Qwen-Image drops its system prefix; Flux.2 drops nothing). A prompt token's text
position is its index in the templated tokenization minus ``drop``; the prompt's characters are found
by rendering the template around a sentinel, so no assumption is made about how the template tokenizes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .family import TokenSpan

__all__ = ["templated_tokens"]

_SENTINEL = "\x00seg4diff\x00"


def templated_tokens(tokenizer: Any, render: Callable[[str], str], prompt: str, drop: int = 0) -> list[TokenSpan]:
    """(text position, char start, char end within ``prompt``) of the tokens that carry ``prompt``'s
    characters in ``render(prompt)``, positions counted after the first ``drop`` tokens.

    Raises:
        ValueError: the template does not contain the prompt verbatim once.
    """
    marked = render(_SENTINEL)
    if marked.count(_SENTINEL) != 1:
        raise ValueError("the prompt template must contain the prompt exactly once")
    start = marked.index(_SENTINEL)
    text = render(prompt)
    if text[start:start + len(prompt)] != prompt:
        raise ValueError("the prompt template changes the prompt's text; its tokens cannot be located")
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False, truncation=False)
    end = start + len(prompt)
    out = []
    for i, (s, e) in enumerate(enc["offset_mapping"]):
        if e > s and s < end and e > start:
            out.append((i - drop, max(s, start) - start, min(e, end) - start))
    return out
