"""The capture state: what one transformer call asks of the processors, and where their maps go.

:class:`CallInfo` is made once per transformer forward call by the forward pre-hook and reaches every
attention processor of that call through the processor kwargs (``joint_attention_kwargs``, or
``attention_kwargs`` for Qwen-Image; diffusers hands that dict to each block, and gradient
checkpointing keeps the very same object for the recompute in backward, which is how a layer knows it
has already recorded this call).

:class:`FastCapture` owns the maps: a running mean per captured layer on the maps' device (or, with
``keep_steps``, every captured call), the CFG half selection, ``word_maps`` with sub-word merging
through the pipeline's tokenizer, and ``reset``.
"""

from __future__ import annotations

import string
import warnings
from typing import Any

import torch

from ..ops.joint_attention import MAX_SELECTED

_PUNCT = string.punctuation + "“”‘’«»"


class CallInfo:
    """One transformer forward call's capture request (made by the pre-hook, read by the processors).

    Attributes:
        index: running number of this captured call since the last ``reset`` (0-based).
        step: the denoising-call index it belongs to (counted transformer calls since ``reset``).
        grid: (h, w) of the image tokens.
        n_img, n_txt: image and text token counts of the joint sequence.
        row0: first image row in the joint sequence (0 for SD3's [image; text], n_txt for the [text; image]
            families: Flux, Flux.2, Qwen-Image).
        col0: joint index of text position 0 (n_img for SD3, 0 for the others).
        positions: the text positions captured (length T).
        keep: batch slice kept (the conditional half under classifier-free guidance), or None for all.
        recorded: slots (captured-layer positions) that already recorded this call.
    """

    __slots__ = ("index", "step", "grid", "n_img", "n_txt", "row0", "col0", "positions", "keep", "recorded",
                 "_cols")

    def __init__(self, index: int, step: int, grid: tuple[int, int], n_txt: int, row0: int, col0: int,
                 positions: tuple[int, ...], keep: slice | None):
        self.index = index
        self.step = step
        self.grid = grid
        self.n_img = grid[0] * grid[1]
        self.n_txt = n_txt
        self.row0 = row0
        self.col0 = col0
        self.positions = positions
        self.keep = keep
        self.recorded: set = set()
        self._cols: dict[torch.device, torch.Tensor] = {}

    @property
    def rows(self) -> tuple[int, int]:
        return (self.row0, self.row0 + self.n_img)

    def cols(self, device: torch.device) -> torch.Tensor:
        """Joint key indices of the captured text positions, (T,) int64 on ``device`` (made once per call)."""
        cols = self._cols.get(device)
        if cols is None:
            cols = torch.tensor(self.positions, dtype=torch.int64).add_(self.col0).to(device)
            self._cols[device] = cols
        return cols

    def __repr__(self) -> str:
        return (f"CallInfo(index={self.index}, step={self.step}, grid={self.grid}, n_txt={self.n_txt}, "
                f"T={len(self.positions)}, keep={self.keep})")


class FastCapture:
    """Attention maps captured during generation by :func:`~seg4diff_fast.enable_fast_capture`.

    Maps layout (float32, on the device the transformer ran on):

    - ``maps``: (B, L, T, h, w), the mean over the captured denoising calls, with B the batch kept
      (the conditional half under classifier-free guidance), L = ``len(layers)`` in the order given,
      T the captured text positions, (h, w) the image-token grid of the actual latent size;
    - ``keep_steps=True``: (S, B, L, T, h, w), one entry per captured call, in call order;
    - ``head_reduce="none"`` adds a head axis after L: (B, L, H, T, h, w).

    ``family`` is the transformer family's name (``"sd3"``, ``"flux"``, ``"flux2"``, ``"qwenimage"``).

    Step indices count the transformer's denoising calls since :meth:`reset` (or since enabling): with
    a pipeline that is the denoising step of the current generation as long as you ``reset()`` between
    generations (maps otherwise keep averaging over all of them). Calls that do not belong to the
    conditional prediction are not counted: SD3's skip-layer-guidance calls (``skip_layers`` given) and
    the true-CFG negative calls of Flux, Flux.2 klein and Qwen-Image (``cache_context("uncond")``).

    Classifier-free guidance rule (SD3/SD3.5, where diffusers batches ``[uncond; cond]``): with
    ``cfg=None`` (the default) a call is a CFG call when the capture is attached to a pipeline whose
    ``do_classifier_free_guidance`` is true at call time and the batch is even; then only the second
    (conditional) half is kept. ``cfg=True``/``False`` forces the rule (e.g. for a bare transformer that
    you drive yourself with a doubled batch). Flux, Flux.2 and Qwen-Image pipelines never double the batch.

    Example:
        >>> import torch
        >>> from seg4diff_fast import enable_fast_capture, disable_fast_capture
        >>> from seg4diff_fast.testing import tiny_sd3_pipeline
        >>> pipe = tiny_sd3_pipeline()                                   # 3 blocks, offline, random weights
        >>> cap = enable_fast_capture(pipe, layers=[1])
        >>> _ = pipe("a cat on a red sofa", num_inference_steps=2, height=32, width=48,
        ...          max_sequence_length=8, output_type="latent")
        >>> cap.maps.shape                                               # (B, L, T, h, w)
        torch.Size([1, 1, 77, 8, 12])
        >>> cap.word_maps("a cat on a red sofa")["sofa"].shape             # sub-words merged
        torch.Size([1, 1, 8, 12])
        >>> cap.reset()
        >>> disable_fast_capture(pipe)
    """

    def __init__(self, family: Any, layers: tuple[int, ...], tokens: tuple[int, ...] | None, mode: str,
                 head_reduce: str, steps: frozenset[int] | None, keep_steps: bool, pipe: Any = None,
                 transformer: torch.nn.Module | None = None, cfg: bool | None = None, backend: str | None = None,
                 measure_mass: bool = False):
        if isinstance(family, str):  # a registered family's name
            from .families import CAPTURE_FAMILIES

            family = CAPTURE_FAMILIES[family]
        self._family = family  # its CaptureFamily adapter
        self.family: str = family.name
        self.layers = layers
        self.tokens = tokens
        self.mode = mode
        self.head_reduce = head_reduce
        self.steps = steps
        self.keep_steps = keep_steps
        self.pipe = pipe
        self.transformer = transformer
        self.cfg = cfg
        self.backend = backend
        self.measure_mass = bool(measure_mass)
        self.enabled = False
        self._context: str | None = None  # diffusers cache_context name of the running call ("cond"/"uncond")
        self.reset()

    # ----------------------------------------------------------------------------------------------
    # state
    def reset(self) -> None:
        """Forget every captured map and restart the step count at 0."""
        self.step_count = 0  # counted (conditional) transformer calls since reset
        self._calls = 0  # captured calls since reset
        n = len(self.layers)
        self._mean: list[torch.Tensor | None] = [None] * n
        self._count = [0] * n
        self._per_call: dict[int, list[torch.Tensor | None]] = {}
        self._steps_of_call: dict[int, int] = {}
        self._signature: tuple | None = None  # (batch kept, T, grid) of the maps held
        self._text_len: int | None = None  # length of the text sequence positions index into (77 for SD3)
        self._mass: dict[int, torch.Tensor] = {}

    @property
    def num_captured(self) -> int:
        """How many transformer calls have recorded maps since the last reset."""
        if self.keep_steps:
            return len(self._per_call)
        return min(self._count) if self._count else 0

    @property
    def captured_steps(self) -> list[int]:
        """Step index of every captured call, in call order."""
        return [self._steps_of_call[i] for i in sorted(self._steps_of_call)]

    def wants_step(self, step: int) -> bool:
        return self.steps is None or step in self.steps

    def new_call(self, step: int, grid: tuple[int, int], n_txt: int, row0: int, col0: int,
                 keep: slice | None, batch: int) -> CallInfo:
        """Called by the pre-hook for a call that captures (before any block runs)."""
        self._text_len = self._family.text_length(n_txt)
        if self.tokens is None:
            positions = tuple(range(self._text_len))
        else:
            bad = [p for p in self.tokens if p >= n_txt]
            if bad:
                raise ValueError(
                    f"enable_fast_capture: tokens {bad} are outside this call's {n_txt} text positions"
                )
            positions = self.tokens
        if len(positions) > MAX_SELECTED:
            raise ValueError(
                f"enable_fast_capture: {len(positions)} text positions captured at once; at most {MAX_SELECTED} are "
                f"supported: pass tokens=[...] (this call has {n_txt} text positions)"
            )
        kept = len(range(batch)[keep]) if keep is not None else batch
        signature = (kept, len(positions), tuple(grid))
        if self._signature is None:
            self._signature = signature
        elif signature != self._signature:
            raise RuntimeError(
                f"fast capture: this call's maps (batch {kept}, {len(positions)} tokens, grid {grid[0]}x{grid[1]}) "
                f"do not match those already captured (batch {self._signature[0]}, {self._signature[1]} tokens, "
                f"grid {self._signature[2][0]}x{self._signature[2][1]}); call cap.reset() between such generations"
            )
        info = CallInfo(self._calls, step, grid, n_txt, row0, col0, positions, keep)
        self._calls += 1
        return info

    def record(self, slot: int, maps: torch.Tensor, info: CallInfo) -> None:
        """Store one layer's maps of one call: (B, R, T) or per head (B, H, R, T), R = h·w rows."""
        if slot in info.recorded:  # the recompute of a gradient-checkpointed block: already have it
            return
        info.recorded.add(slot)
        if info.keep is not None:
            maps = maps[info.keep]
        maps = maps.transpose(-1, -2).unflatten(-1, info.grid)  # (B, [H,] T, h, w)
        if not maps.requires_grad:  # a compact copy: the CFG half of a transposed view
            maps = maps.clone(memory_format=torch.contiguous_format)
        self._steps_of_call.setdefault(info.index, info.step)
        if self.keep_steps:
            self._per_call.setdefault(info.index, [None] * len(self.layers))[slot] = maps
            return
        acc = self._mean[slot]
        self._count[slot] += 1
        if acc is None:
            self._mean[slot] = maps
            return
        weight = 1.0 / self._count[slot]
        if maps.requires_grad or acc.requires_grad:
            self._mean[slot] = torch.lerp(acc, maps, weight)
        else:
            acc.lerp_(maps, weight)

    def record_mass(self, layer: int, part: torch.Tensor, info: CallInfo) -> None:
        """Add one block's (H, 2) ``[I2T, T2T]`` text-key mass of one call (``measure_mass``)."""
        key = ("mass", layer)
        if key in info.recorded:  # a gradient-checkpointing recompute
            return
        info.recorded.add(key)
        self._mass[layer] = part if layer not in self._mass else self._mass[layer] + part

    @property
    def block_mass(self) -> dict[int, torch.Tensor]:
        """``{block: (H, 2) float64}``: per head, the text-key mass of the image rows (I2T) and of the text
        rows (T2T), each averaged over its rows and summed over the batch and the calls since :meth:`reset`
        (``enable_fast_capture(measure_mass=True)``); divide by the number of images for the mean."""
        return dict(self._mass)

    @property
    def maps(self) -> torch.Tensor:
        """float32 (B, L, T, h, w): the mean over captured calls; (S, B, L, T, h, w) with keep_steps."""
        if self.keep_steps:
            calls = [v for v in self._per_call.values() if all(m is not None for m in v)]
            if not calls:
                raise RuntimeError(self._nothing_yet())
            return torch.stack([torch.stack(v, dim=1) for v in calls], dim=0)
        if any(m is None for m in self._mean):
            raise RuntimeError(self._nothing_yet())
        return torch.stack(self._mean, dim=1)  # type: ignore[arg-type]

    def _nothing_yet(self) -> str:
        state = "enabled" if self.enabled else "disabled"
        return (f"fast capture ({state}, layers {list(self.layers)}): no maps captured yet; run the pipeline "
                f"(or transformer) first{'' if self.steps is None else f' on one of steps {sorted(self.steps)}'}")

    # ----------------------------------------------------------------------------------------------
    # words
    def _default_tokenizer(self):
        pipe = self.pipe
        name = self._family.tokenizer_attr
        tok = getattr(pipe, name, None) if pipe is not None else None
        if tok is None:
            raise ValueError(
                f"word_maps needs a tokenizer: this capture has no pipeline {name}; pass tokenizer=... "
                f"({self._family.tokenizer_kind})"
            )
        return tok

    def token_positions(self, prompt: str, tokenizer: Any = None) -> dict[str, list[int]]:
        """Text positions of each word of ``prompt`` (whitespace-separated, surrounding punctuation
        stripped; a repeated word collects all its occurrences).

        Positions are those of the captured text sequence: for SD3/SD3.5 the CLIP tokenizer's (BOS at
        0, so the first word starts at 1); for Flux the T5 tokenizer's (no BOS, first word at 0); for
        Flux.2 klein the Qwen3 tokenizer's after the chat template's tokens before the prompt; for
        Qwen-Image the Qwen2.5-VL tokenizer's with the dropped template prefix (first word at 0).
        A word made of several sub-word tokens gets all of them; pure punctuation tokens are dropped.
        """
        tok = tokenizer if tokenizer is not None else self._default_tokenizer()
        full = tok(prompt, add_special_tokens=False)["input_ids"]
        with_special = tok(prompt)["input_ids"]
        bos = getattr(tok, "bos_token_id", None)
        pos = 1 if (bos is not None and with_special[:1] == [bos]) else 0
        pos += self._family.prompt_offset(self.pipe, tok)  # a chat template before the prompt (Flux.2 klein)
        words: dict[str, list[int]] = {}
        consumed = 0
        spaced = self._family.byte_level_text  # byte-level BPE: a word after a space is its own token ("Ġcat")
        for n, chunk in enumerate(prompt.split()):
            ids = tok((" " + chunk) if spaced and n else chunk, add_special_tokens=False)["input_ids"]
            pieces = tok.convert_ids_to_tokens(ids)
            word = chunk.strip(_PUNCT)
            for i, piece in enumerate(pieces):
                text = piece.replace("</w>", "").replace("▁", "").replace("Ġ", "")
                if word and any(c.isalnum() for c in text):
                    words.setdefault(word, []).append(pos + i)
            pos += len(ids)
            consumed += len(ids)
        if consumed != len(full):
            raise ValueError(
                f"word_maps: tokenizing {prompt!r} word by word gives {consumed} tokens but the whole prompt "
                f"{len(full)}; pass explicit positions to maps_at(...) instead"
            )
        return words

    def maps_at(self, positions: list[int] | tuple[int, ...]) -> torch.Tensor:
        """Mean of the maps over the given text positions: ``maps`` with the T axis reduced away."""
        index = self._index_of_positions()
        missing = [p for p in positions if p not in index]
        if missing:
            raise ValueError(f"text positions {missing} were not captured (captured: {self._captured_desc()})")
        maps = self.maps
        idx = torch.tensor([index[p] for p in positions], device=maps.device)
        return maps.index_select(-3, idx).mean(-3)

    def word_maps(self, prompt: str, tokenizer: Any = None) -> dict[str, torch.Tensor]:
        """One map per word of ``prompt``: the mean of its sub-word tokens' maps.

        Returns ``{word: (B, L, h, w)}`` (with keep_steps (S, B, L, h, w); with head_reduce="none"
        (B, L, H, h, w)). Each word uses those of its token positions that were captured and that
        survive the tokenizer's truncation (CLIP keeps 75 content tokens before EOS at 76); a word with
        none left is left out with a warning. ``tokenizer`` defaults to the pipeline's CLIP tokenizer
        (SD3/SD3.5), T5 tokenizer (Flux) or ``tokenizer`` (Flux.2 klein, Qwen-Image).
        """
        tok = tokenizer if tokenizer is not None else self._default_tokenizer()
        index = self._index_of_positions()
        maps = self.maps
        empty = tok("")["input_ids"]
        bos = getattr(tok, "bos_token_id", None)
        end_specials = len(empty) - (1 if bos is not None and empty[:1] == [bos] else 0)
        limit = (self._text_len or maps.shape[-3]) - end_specials  # content positions that survive truncation
        out: dict[str, torch.Tensor] = {}
        dropped = []
        for word, positions in self.token_positions(prompt, tok).items():
            kept = [index[p] for p in positions if p < limit and p in index]
            if not kept:
                dropped.append(word)
                continue
            out[word] = maps.index_select(-3, torch.tensor(kept, device=maps.device)).mean(-3)
        if dropped:
            warnings.warn(
                f"word_maps: {dropped} fall outside the captured text positions ({self._captured_desc()}, "
                f"content truncated at {limit}) and are left out", stacklevel=2,
            )
        return out

    def _index_of_positions(self) -> dict[int, int]:
        if self.tokens is not None:
            return {p: i for i, p in enumerate(self.tokens)}
        t = self.maps.shape[-3]
        return {p: p for p in range(t)}

    def _captured_desc(self) -> str:
        if self.tokens is not None:
            return f"positions {list(self.tokens)}"
        return f"positions 0..{self.maps.shape[-3] - 1}"

    def __repr__(self) -> str:
        return (f"FastCapture(family={self.family!r}, layers={list(self.layers)}, mode={self.mode!r}, "
                f"head_reduce={self.head_reduce!r}, captured={self.num_captured}, enabled={self.enabled})")
