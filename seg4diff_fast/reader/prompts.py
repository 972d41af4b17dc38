"""Prompts from class names, the class tokens' positions in them, and vocabulary chunking.

SEG4DIFF.md: the prompt is the class names joined by single spaces (a name's text before its first
``-``, as in the authors' code, unless ``split_dash=False``); CLIP, 77 positions, BOS at 0; class j's
tokens are those of the name tokenized alone (BOS/EOS dropped), n_j of them, and the names occupy
consecutive positions starting at 1. (Found here from the tokenizer's character offsets in the joined
prompt, which gives exactly that for CLIP and also serves T5 — from 0 — and chat-templated encoders,
whose model family says where the prompt's tokens land.) A prompt holds at most ``77 − 2 = 75`` content
tokens; a vocabulary that does not fit is split, in order, into as few consecutive chunks as greedily fit, each its own
prompt (the authors do not guard this; their maps become NaN past 77).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["PromptChunk", "clean_name", "content_limit", "plan_prompts", "special_ids", "tokenizer_spans"]


@dataclass(frozen=True)
class PromptChunk:
    """One prompt of a vocabulary.

    Attributes:
        prompt: the text given to the CLIP tokenizers.
        classes: indices (into the full class list) of the classes it holds, in order.
        positions: for each of those classes, its CLIP token positions in the prompt (BOS at 0).
    """

    prompt: str
    classes: tuple[int, ...]
    positions: tuple[tuple[int, ...], ...]


def clean_name(name: str, split_dash: bool = True) -> str:
    """The text of a class name that goes into the prompt: before the first ``-`` (the authors' rule for
    COCO-Stuff names such as ``"wall-brick"``) unless ``split_dash=False``; surrounding spaces stripped.

    Example:
        >>> clean_name("wall-brick"), clean_name("bed "), clean_name("t-shirt", split_dash=False)
        ('wall', 'bed', 't-shirt')
    """
    if not isinstance(name, str):
        raise TypeError(f"class names must be strings, got {type(name).__name__}")
    if split_dash:
        name = name.split("-", 1)[0]
    return " ".join(name.split())


def content_limit(tokenizer: Any) -> int:
    """Content tokens a prompt can hold: the tokenizer's length (77) minus BOS and EOS."""
    empty = tokenizer("")["input_ids"]
    return int(tokenizer.model_max_length) - len(empty)


def special_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special tokens (BOS, EOS, padding, unknown and the rest it declares)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        v = getattr(tokenizer, name, None)
        if v is not None:
            ids.add(int(v))
    return ids


def tokenizer_spans(tokenizer: Any, prompt: str) -> list[tuple[int, int, int]]:
    """(position, char start, char end) of each token of ``prompt`` that carries characters, positions
    counted in the tokenizer's own encoding with its special tokens (CLIP: BOS at 0; T5: from 0).

    Example:
        >>> from seg4diff_fast.testing import tiny_clip_tokenizer
        >>> tokenizer_spans(tiny_clip_tokenizer(), "cat sofa")
        [(1, 0, 3), (2, 4, 6), (3, 6, 8)]
    """
    enc = tokenizer(prompt, return_offsets_mapping=True, truncation=False)
    return [(i, s, e) for i, (s, e) in enumerate(enc["offset_mapping"]) if e > s]


def _trimmed(prompt: str, position: int, start: int, end: int) -> tuple[int, int, int]:
    """A token's span without the spaces it carries (byte-level BPE puts a word's leading space in its token)."""
    while start < end and prompt[start].isspace():
        start += 1
    while end > start and prompt[end - 1].isspace():
        end -= 1
    return position, start, end


def plan_prompts(
    names: Sequence[str], tokenizer: Any, max_tokens: int | None = None, split_dash: bool = True, *,
    locate: Callable[[str], list[tuple[int, int, int]]] | None = None, limit: int | None = None,
) -> list[PromptChunk]:
    """Split a class list into prompts that fit and locate every class's tokens.

    Args:
        names: class names (at least one).
        tokenizer: the tokenizer of the text positions (SD3: the first CLIP tokenizer, which CLIP-G shares).
        max_tokens: content tokens per prompt; default and maximum ``limit``.
        split_dash: keep only the text before a name's first ``-`` (the authors' rule).
        locate: a prompt → its tokens as (text position, char start, char end) (the model family's
            :meth:`~seg4diff_fast.reader.family.ModelFamily.prompt_tokens`; a chat template moves them);
            default :func:`tokenizer_spans`.
        limit: content tokens one prompt can hold; default :func:`content_limit` (CLIP: 75).

    Returns:
        One :class:`PromptChunk` per prompt, classes in their given order (one chunk when all fit). A class's
        positions are the tokens of the joined prompt that carry its characters, so sub-words are merged and
        a tokenizer that splits a word differently inside a sentence is still read right.

    Raises:
        ValueError: an empty list, a name that tokenizes to nothing (or only to special / unknown
            tokens), a single name longer than a prompt.

    Example:
        >>> from seg4diff_fast.testing import tiny_clip_tokenizer
        >>> [c.positions for c in plan_prompts(["cat", "sofa", "red car"], tiny_clip_tokenizer())]
        [((1,), (2, 3), (4, 5))]
        >>> [c.prompt for c in plan_prompts(["cat", "sofa", "red car"], tiny_clip_tokenizer(), max_tokens=3)]
        ['cat sofa', 'red car']
    """
    names = list(names)
    if not names:
        raise ValueError("the class list is empty; give at least one class name")
    limit = content_limit(tokenizer) if limit is None else int(limit)
    max_tokens = limit if max_tokens is None else int(max_tokens)
    if not 1 <= max_tokens <= limit:
        raise ValueError(f"max_tokens must be in 1..{limit}, got {max_tokens}")
    locate = locate or (lambda prompt: tokenizer_spans(tokenizer, prompt))
    specials = special_ids(tokenizer)
    texts, counts = [], []
    for name in names:
        text = clean_name(name, split_dash)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        if not ids or all(i in specials for i in ids):
            raise ValueError(f"class name {name!r} tokenizes to nothing (no usable tokens)")
        if len(ids) > max_tokens:
            raise ValueError(f"class name {name!r} takes {len(ids)} tokens, more than a prompt holds ({max_tokens})")
        texts.append(text)
        counts.append(len(ids))

    groups: list[list[int]] = [[]]
    used = 0
    for j, n in enumerate(counts):
        if used + n > max_tokens:
            groups.append([])
            used = 0
        groups[-1].append(j)
        used += n

    chunks = []
    for group in groups:
        prompt = " ".join(texts[j] for j in group)
        spans = [t for t in (_trimmed(prompt, *span) for span in locate(prompt)) if t[2] > t[1]]
        if len(spans) > max_tokens:
            raise ValueError(f"the prompt {prompt!r} takes {len(spans)} tokens, more than a prompt holds "
                             f"({max_tokens}); pass a smaller max_tokens")
        positions, start = [], 0
        for j in group:
            end = start + len(texts[j])
            mine = tuple(p for p, s, e in spans if s < end and e > start)
            if not mine or any(s < start or e > end for p, s, e in spans if p in mine):
                raise ValueError(f"class name {names[j]!r} has no tokens of its own in the prompt {prompt!r}; "
                                 "its map cannot be read")
            positions.append(mine)
            start = end + 1
        chunks.append(PromptChunk(prompt, tuple(group), tuple(positions)))
    return chunks
