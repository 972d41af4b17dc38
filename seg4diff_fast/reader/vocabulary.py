"""Class names against the model's tokenizer: repeated names, and words the tokenizer does not know whole.

A segmenter reads one attention map per class from the text tokens of its name, so a class is only as good
as the tokens it is spelled with:

- a name given twice (:func:`check_repeated`) is an error: two classes with one prompt get the same map, the
  first always wins the argmax, and the second is never predicted;
- a word the tokenizer does not know as a word (:func:`check_vocabulary`) is read as pieces: the embedded
  ShapesWorld model splits ``"cat"`` into ``c a t``, so its map is the map of three letters, not of a cat,
  and the result is confident nonsense. A word is *known* when it tokenizes to a single token, alone or after
  a space (the two ways a name sits in a prompt: first, or after another name). This is exact for the small
  vocabularies of the embedded and test models; for real tokenizers (CLIP, T5: 32k–50k tokens) a split is
  not always a problem (a rare word may still be understood from its pieces), so the CLI warns and
  ``--strict`` refuses;
- names that read as the same tokens (``"wall-brick"`` and ``"wall-stone"`` both become ``"wall"`` under the
  authors' dash rule; ``"Cat"`` and ``"cat"`` under CLIP's lower-casing) get identical maps: a warning too.

For a small vocabulary (at most :data:`LIST_LIMIT` tokens) the check lists the words the model knows
(:func:`known_words`); for a big one it names each split word and its pieces.

Example:
    >>> from seg4diff_fast.testing import tiny_clip_tokenizer
    >>> check = check_vocabulary(["cat", "sofa", "zebra"], tiny_clip_tokenizer())
    >>> [(u.word, u.pieces) for u in check.unknown]
    [('sofa', ('so', 'fa')), ('zebra', ('z', 'e', 'b', 'r', 'a'))]
    >>> "photo" in check.known_words
    True
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .prompts import clean_name, special_ids

__all__ = ["LIST_LIMIT", "UnknownWord", "VocabularyCheck", "check_repeated", "check_vocabulary", "known_words",
           "word_pieces"]

#: Vocabularies up to this many tokens are small enough to list their words in a message.
LIST_LIMIT = 2000
#: Unknown words and same-token groups named in one message (the rest are counted).
SHOWN = 8

_WORD = re.compile(r"[^\W_]+")


def check_repeated(names: Sequence[str], where: str = "--classes") -> None:
    """Refuse a class list that names a class twice (compared after trimming and collapsing spaces).

    Raises:
        ValueError: one line naming the repeated name(s), their positions (1-based) and the fix.

    Example:
        >>> check_repeated(["red", "blue"])
        >>> check_repeated(["red", "blue", " red"])
        Traceback (most recent call last):
        ...
        ValueError: --classes: "red" is given twice (classes 1 and 3); each class needs its own name: remove the repeat
    """
    seen: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        seen.setdefault(" ".join(str(name).split()), []).append(i + 1)
    repeated = [(n, pos) for n, pos in seen.items() if len(pos) > 1]
    if not repeated:
        return
    parts = []
    for n, pos in repeated[:SHOWN]:
        times = "twice" if len(pos) == 2 else f"{len(pos)} times"
        parts.append(f'"{n}" is given {times} (classes {", ".join(map(str, pos[:-1]))} and {pos[-1]})')
    more = f" (and {len(repeated) - SHOWN} more)" if len(repeated) > SHOWN else ""
    fix = "remove the repeat" if len(repeated) == 1 else "remove the repeats"
    raise ValueError(f"{where}: {'; '.join(parts)}{more}; each class needs its own name: {fix}")


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _piece(tokenizer: Any, token_id: int) -> str:
    text = tokenizer.decode([int(token_id)]).strip()
    return text or tokenizer.convert_ids_to_tokens([int(token_id)])[0]


def word_pieces(tokenizer: Any, word: str) -> tuple[str, ...]:
    """The pieces the tokenizer reads ``word`` as: one piece for a known word (alone or after a space,
    whichever gives fewer tokens), else its sub-word tokens as text.

    Example:
        >>> from seg4diff_fast.testing import tiny_clip_tokenizer
        >>> word_pieces(tiny_clip_tokenizer(), "cat"), word_pieces(tiny_clip_tokenizer(), "sofa")
        (('cat',), ('so', 'fa'))
    """
    specials = special_ids(tokenizer)
    best: list[int] | None = None
    for text in (word, " " + word):
        ids = [i for i in _ids(tokenizer, text) if i not in specials]
        if ids and (best is None or len(ids) < len(best)):
            best = ids
    if best is None:
        return ()
    return tuple(_piece(tokenizer, i) for i in best)


def known_words(tokenizer: Any, limit: int = LIST_LIMIT) -> list[str] | None:
    """The words (letters only, two or more) the tokenizer reads as one token, sorted; None when its
    vocabulary has more than ``limit`` tokens (too many to list).

    Example:
        >>> from seg4diff_fast.testing import tiny_clip_tokenizer
        >>> words = known_words(tiny_clip_tokenizer())
        >>> "cat" in words, "sofa" in words, "so" in words
        (True, False, False)
    """
    try:
        vocab = tokenizer.get_vocab()
    except (AttributeError, NotImplementedError):
        return None
    if len(vocab) > limit:
        return None
    specials = special_ids(tokenizer)
    words = set()
    for token_id in vocab.values():
        if token_id in specials:
            continue
        text = _piece(tokenizer, token_id)
        if len(text) >= 2 and text.isalpha() and len(word_pieces(tokenizer, text)) == 1:
            words.add(text)
    return sorted(words)


@dataclass(frozen=True)
class UnknownWord:
    """A word of a class name that the tokenizer splits: ``name`` (as given), ``word``, its ``pieces``."""

    name: str
    word: str
    pieces: tuple[str, ...]

    def describe(self) -> str:
        where = f'"{self.word}"' if self.word == self.name.strip() else f'"{self.word}" in "{self.name.strip()}"'
        return f"{where} (read as {' '.join(self.pieces)})"


@dataclass
class VocabularyCheck:
    """What :func:`check_vocabulary` found.

    Attributes:
        unknown: the split words, in class order.
        same_tokens: groups of class names (as given) that read as the same tokens, with that text.
        known_words: the tokenizer's whole words (small vocabularies), else None.
        dash_merged: whether a ``same_tokens`` group comes from the dash rule (``--keep-dashes`` separates it).
    """

    unknown: list[UnknownWord] = field(default_factory=list)
    same_tokens: list[tuple[str, list[str]]] = field(default_factory=list)
    known_words: list[str] | None = None
    dash_merged: bool = False

    @property
    def ok(self) -> bool:
        return not self.unknown and not self.same_tokens

    def message(self) -> str:
        """One line: what is wrong and what to do (empty when :attr:`ok`)."""
        parts = []
        if self.unknown:
            shown = ", ".join(u.describe() for u in self.unknown[:SHOWN])
            more = f" and {len(self.unknown) - SHOWN} more" if len(self.unknown) > SHOWN else ""
            one = len(self.unknown) == 1
            text = (f"the model's tokenizer does not know {shown}{more} as {'a word' if one else 'words'}: "
                    f"{'that class gets' if one else 'those classes get'} the attention of the pieces, not of "
                    f"the concept, and {'is' if one else 'are'} unreliable")
            if self.known_words is not None:
                text += f"; the words it knows: {', '.join(self.known_words)}"
            else:
                text += "; use a more common word or a synonym the tokenizer keeps whole"
            parts.append(text)
        if self.same_tokens:
            groups = "; ".join(f"{' and '.join(repr(n) for n in names)} read as the same tokens ({text!r})"
                               for text, names in self.same_tokens[:SHOWN])
            more = f" (and {len(self.same_tokens) - SHOWN} more groups)" if len(self.same_tokens) > SHOWN else ""
            fix = "--keep-dashes keeps the text after '-', or rename them" if self.dash_merged else "rename them"
            parts.append(f"{groups}{more}: they get identical maps and the first always wins ({fix})")
        return "; ".join(parts)


def check_vocabulary(names: Sequence[str], tokenizer: Any, split_dash: bool = True) -> VocabularyCheck:
    """Check each class name's words against ``tokenizer`` (the one whose positions the maps are read at;
    :attr:`seg4diff_fast.reader.PipelineReader.tokenizer`).

    Args:
        names: the class names as given.
        tokenizer: a Hugging Face tokenizer.
        split_dash: the names' prompt text is cut at the first ``-`` (the segmenter's ``split_dash``).

    Example:
        >>> from seg4diff_fast.testing import tiny_clip_tokenizer
        >>> c = check_vocabulary(["wall-brick", "wall-stone", "cat"], tiny_clip_tokenizer())
        >>> c.same_tokens, c.dash_merged
        ([('wall', ['wall-brick', 'wall-stone'])], True)
    """
    check = VocabularyCheck()
    cache: dict[str, tuple[str, ...]] = {}
    by_ids: dict[tuple[int, ...], list[int]] = {}
    for j, name in enumerate(names):
        text = clean_name(name, split_dash)
        for word in _WORD.findall(text):
            if word not in cache:
                cache[word] = word_pieces(tokenizer, word)
            if len(cache[word]) > 1:
                check.unknown.append(UnknownWord(str(name), word, cache[word]))
        if text:
            by_ids.setdefault(tuple(_ids(tokenizer, text)), []).append(j)
    for group in by_ids.values():
        if len(group) > 1:
            check.same_tokens.append((clean_name(names[group[0]], split_dash), [str(names[j]) for j in group]))
            cut = {clean_name(names[j], split_dash) for j in group}
            if split_dash and len(cut) == 1 and len({clean_name(names[j], False) for j in group}) > 1:
                check.dash_merged = True
    if check.unknown:
        check.known_words = known_words(tokenizer)
    return check
