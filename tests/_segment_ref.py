"""Reference helpers shared by the segmentation tests: the Seg4Diff recipe rebuilt from stock diffusers
parts (F.interpolate stretch, stock VAE, scheduler σ, pipe.encode_prompt with 77 zero T5 positions, a full
stock forward recorded by record_stock_attention, float64 materialized softmax)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from seg4diff_fast.testing import record_stock_attention, reference_maps

RES = 32  # tiny VAE factor 2, patch 2 -> 8x8 tokens
GRID = (RES // 4, RES // 4)


def _image(rng, h, w) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _reference_latent(pipe, img01: torch.Tensor, seed: int) -> torch.Tensor:
    from diffusers import FlowMatchEulerDiscreteScheduler

    x = F.interpolate(img01[None], (RES, RES), mode="bilinear", align_corners=False) * 2 - 1
    latent = pipe.vae.encode(x).latent_dist.mean
    latent = (latent - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(28)
    t = sched.timesteps[-8]
    sigma = sched.sigmas[28 - 8]
    noise = torch.randn(latent.shape[1:], generator=torch.Generator().manual_seed(seed))
    return sigma * noise + (1 - sigma) * latent, t


def _reference_token_maps(pipe, img01, prompt, seed, layers=(1,), positions=range(77)) -> torch.Tensor:
    """(L, T, h, w) float64 from a full stock forward."""
    with torch.no_grad():
        x_t, t = _reference_latent(pipe, img01, seed)
        pe, _, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, prompt_3=None,
                                              do_classifier_free_guidance=False, max_sequence_length=77)
        with record_stock_attention(pipe.transformer) as rec:
            pipe.transformer(hidden_states=x_t, timestep=t[None], encoder_hidden_states=pe,
                             pooled_projections=pooled, return_dict=False)
    return reference_maps(rec, pipe.transformer, list(layers), GRID, list(positions))[0]


def _reference_class_maps(pipe, token_maps, names) -> torch.Tensor:
    pos, out = 1, []
    for name in names:
        n = len(pipe.tokenizer(name, add_special_tokens=False)["input_ids"])
        out.append(token_maps[..., pos:pos + n, :, :].mean(-3))
        pos += n
    return torch.stack(out, -3)


def _labels_match(scores64: torch.Tensor, size, labels: np.ndarray) -> None:
    up = F.interpolate(scores64[None], size, mode="bilinear", align_corners=False)[0]
    ref = up.argmax(0).numpy()
    top2 = up.topk(2, dim=0).values if up.shape[0] > 1 else None
    clear = np.ones(size, bool) if top2 is None else (top2[0] - top2[1]).numpy() > 1e-6 * float(up.abs().max())
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(labels[clear], ref[clear])
