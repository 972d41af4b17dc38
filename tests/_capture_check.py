"""What the per-family capture tests (``test_capture_{sd3,flux,flux2,qwenimage}.py``) share: the prompt, one
seeded generation, true CFG's negative calls left out of the capture, and early exit and the attention mass
on a bare transformer. Each check asserts as the tests did (conftest registers this module for pytest's
assertion rewriting)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from conftest import fresh_seed

from seg4diff_fast import disable_fast_capture, enable_fast_capture
from seg4diff_fast.capture import EarlyExit, early_exit
from seg4diff_fast.testing import record_stock_attention, reference_maps, reference_mass

PROMPT = "a cat on a red sofa"


def generate(pipe, seed: int, prompt=PROMPT, **kw) -> torch.Tensor:
    """The latents of ``pipe(prompt=prompt, ...)``: 2 steps at 32×32 from ``seed``; ``kw`` add or override."""
    args = dict(num_inference_steps=2, height=32, width=32, output_type="latent")
    args.update(kw)
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), **args).images


@contextmanager
def stock_restored_after(pipe, gen: Callable, seed: int) -> Iterator[torch.Tensor]:
    """The stock latents of ``gen(pipe, seed, width=48)`` for the block (which enables fast capture); after it,
    ``disable_fast_capture`` gives back the very same stock processors, no ``cache_context``, the same latents."""
    stock_procs = dict(pipe.transformer.attn_processors)
    stock = gen(pipe, seed, width=48)
    yield stock
    disable_fast_capture(pipe)
    procs = pipe.transformer.attn_processors
    assert procs.keys() == stock_procs.keys() and all(procs[k] is p for k, p in stock_procs.items())
    assert "cache_context" not in pipe.transformer.__dict__
    assert torch.equal(gen(pipe, seed, width=48), stock)


def check_true_cfg_negative_calls_not_captured(pipe, gen: Callable, record=record_stock_attention, **ref_kw) -> None:
    """True CFG (3 steps, a negative prompt) calls block 1 twice a step; fast capture keeps the outputs and
    captures only the prompt's calls (0, 2, 4) at every step. ``ref_kw`` go to :func:`reference_maps`."""
    seed = fresh_seed()
    kw = dict(num_inference_steps=3, negative_prompt="a dog", true_cfg_scale=3.0)
    with record(pipe.transformer) as rec:
        stock = gen(pipe, seed, **kw)
    assert len(rec["transformer_blocks.1.attn"]) == 6  # (cond, uncond) per step
    cap = enable_fast_capture(pipe, layers=[1, 2], tokens=[0, 1, 5], keep_steps=True)
    torch.testing.assert_close(gen(pipe, seed, **kw), stock, rtol=1e-5, atol=1e-5)
    assert cap.step_count == 3 and cap.captured_steps == [0, 1, 2]
    ref = reference_maps(rec, pipe.transformer, [1, 2], (8, 8), [0, 1, 5], calls=[0, 2, 4], keep_steps=True,
                         **ref_kw)
    torch.testing.assert_close(cap.maps.double(), ref, rtol=1e-4, atol=1e-7)


def run_to_early_exit(model, x: dict, layers: list[int], stop_after: int, backend: str, next_attn) -> object:
    """Fast capture of ``layers`` stopping after block ``stop_after``: the forward raises ``EarlyExit``,
    ``early_exit()`` absorbs it, and ``next_attn`` (the next block's attention) never runs. The capture."""
    ran = []
    hook = next_attn.register_forward_pre_hook(lambda *a: ran.append(1))
    try:
        cap = enable_fast_capture(model, layers=layers, stop_after=stop_after, backend=backend)
        with torch.no_grad():
            with pytest.raises(EarlyExit):
                model(**x)
            with early_exit():
                model(**x)
    finally:
        hook.remove()
    assert not ran  # nothing after the stop block's attention runs
    return cap


def check_block_mass(model, x: dict, rec: dict, n_blocks: int, n_img: int, n_txt: int, backend: str,
                     seed: int) -> None:
    """``measure_mass=True`` alone: every block's ``block_mass`` equals :func:`reference_mass` of ``rec``."""
    cap = enable_fast_capture(model, layers=[], measure_mass=True, backend=backend)
    with torch.no_grad():
        model(**x)
    got = torch.stack([cap.block_mass[i] for i in range(n_blocks)])
    torch.testing.assert_close(got, reference_mass(rec, model, n_img, n_txt), rtol=1e-5, atol=1e-6, msg=f"seed {seed}")
