"""MAGNET training loop on tiny offline pipelines: outputs a stock pipeline loads, exact resume, gradients
that reach exactly the blocks the mask loss depends on, matched (SA-1B-style) data, the authors' .pth,
bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import fresh_seed
from PIL import Image

from seg4diff_fast.magnet import (
    MagnetConfig,
    MagnetSample,
    ShapesMagnetData,
    add_magnet_lora,
    load_magnet_lora,
    save_magnet_lora,
    train_magnet,
)
from seg4diff_fast.magnet.batch import plan_tokens, predictions_and_targets
from seg4diff_fast.magnet.lora import lora_state_dict
from seg4diff_fast.testing import tiny_clip_tokenizer, tiny_sd3_pipeline


def _cfg(**kw) -> MagnetConfig:
    base = dict(layer=1, rank=2, max_steps=3, batch_size=2, warmup_steps=1, resolution=32, lr=1e-2,
                max_grad_norm=1.0, log_every=1)
    base.update(kw)
    return MagnetConfig(**base)


def _transformer_out(pipe, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.transformer.config
    x = torch.randn(1, cfg.in_channels, 8, 8, generator=g)
    e = torch.randn(1, 77, cfg.joint_attention_dim, generator=g)
    p = torch.randn(1, cfg.pooled_projection_dim, generator=g)
    with torch.no_grad():
        return pipe.transformer(x, e, p, torch.tensor([500.0]), return_dict=False)[0]


class _Matched(torch.utils.data.Dataset):
    """SA-1B-style samples: a caption and unlabelled masks (rectangles)."""

    def __init__(self, n: int, size: int = 32):
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> MagnetSample:
        rng = np.random.default_rng(i)
        img = rng.integers(0, 255, (self.size, self.size, 3), dtype=np.uint8)
        masks = np.zeros((2, self.size, self.size), bool)
        masks[0, :16] = True
        masks[1, 16:, rng.integers(4, 20):] = True
        return MagnetSample(Image.fromarray(img), "a red cat on a green sofa", masks, None, key=str(i))


def test_train_writes_a_lora_a_stock_pipeline_loads(tmp_path):
    seed = fresh_seed()
    pipe = tiny_sd3_pipeline(t5=False, seed=seed % 1000)
    out = str(tmp_path / "run")
    summary = train_magnet(pipe, ShapesMagnetData(16, seed=seed % 10_000), _cfg(seed=seed % 1000), out, progress=False)
    assert summary["steps"] == 3 and summary["final"]["masks"] > 0
    for name in ("pytorch_lora_weights.safetensors", "magnet_head.safetensors", "magnet_config.json",
                 "log.jsonl", "summary.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(np.isfinite([r["fm"], r["focal"], r["dice"]]).all() for r in log)
    assert json.load(open(os.path.join(out, "magnet_config.json")))["layer"] == 1

    fresh = tiny_sd3_pipeline(t5=False, seed=seed % 1000)
    before = _transformer_out(fresh, seed)
    fresh.load_lora_weights(out)  # the stock diffusers loader
    after = _transformer_out(fresh, seed)
    trained = _transformer_out(pipe, seed)
    assert not torch.allclose(before, after)  # the LoRA changed something
    torch.testing.assert_close(after, trained, rtol=1e-4, atol=1e-5)


def test_resume_ends_with_the_same_lora(tmp_path):
    seed = fresh_seed() % 1000
    data = ShapesMagnetData(8, seed=seed)
    cfg = _cfg(max_steps=4, checkpoint_every=1, seed=seed)
    full = tiny_sd3_pipeline(t5=False, seed=seed)
    train_magnet(full, data, cfg, str(tmp_path / "full"), progress=False)

    class Stop(Exception):
        pass

    def stop_at_2(step, losses):
        if step == 2:
            raise Stop

    cut = str(tmp_path / "cut")
    with pytest.raises(Stop):
        train_magnet(tiny_sd3_pipeline(t5=False, seed=seed), data, cfg, cut, progress=False, on_step=stop_at_2)
    with pytest.raises(FileExistsError, match="resume"):
        train_magnet(tiny_sd3_pipeline(t5=False, seed=seed), data, cfg, cut, progress=False)
    resumed = tiny_sd3_pipeline(t5=False, seed=seed)
    summary = train_magnet(resumed, data, cfg, cut, resume=True, progress=False)
    assert summary["resumed_from"] == 2
    a, b = lora_state_dict(full.transformer), lora_state_dict(resumed.transformer)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_mask_loss_gradients_reach_only_blocks_up_to_the_layer(tmp_path):
    """With the flow-matching weight at 0 the loss depends on blocks 0..layer only: their LoRA moves,
    later blocks' LoRA gets no gradient at all."""
    seed = fresh_seed() % 1000
    pipe = tiny_sd3_pipeline(t5=False, seed=seed, num_layers=3)
    grads: dict[str, float] = {}

    def grab(step, losses):
        for n, p in pipe.transformer.named_parameters():
            if "lora_B" in n:
                grads[n] = p.detach().abs().sum().item()

    cfg = _cfg(layer=1, lambda_fm=0.0, max_steps=1, conv_head=False, warmup_steps=0, max_grad_norm=None)
    train_magnet(pipe, ShapesMagnetData(4, seed=seed), cfg, str(tmp_path / "r"), progress=False, on_step=grab)
    # peft's gaussian init draws A and zeros B: after one step B is non-zero exactly where a gradient came
    moved = {n.split(".attn")[0] for n, v in grads.items() if v > 0}
    assert "transformer_blocks.0" in moved and "transformer_blocks.1" in moved
    assert "transformer_blocks.2" not in moved


def test_direct_predictions_are_class_token_means():
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    tok = tiny_clip_tokenizer()
    plan = plan_tokens("", ["cat", "red car"], tok)
    maps = torch.randn(1, 3, 77, 4, 4, generator=g)  # per head
    masks = [torch.randint(0, 2, (2, 8, 8), generator=g, dtype=torch.uint8)]
    pred, tgt = predictions_and_targets(maps, masks, [plan])
    mean = maps[0].double().mean(0)
    torch.testing.assert_close(pred.double(), torch.stack([mean[1], mean[2:4].mean(0)]))
    assert torch.equal(tgt, masks[0])


def test_matched_data_trains_per_head_and_head_mean(tmp_path):
    seed = fresh_seed() % 1000
    for reduce in ("none", "mean"):
        pipe = tiny_sd3_pipeline(t5=False, seed=seed)
        s = train_magnet(pipe, _Matched(4), _cfg(head_reduce=reduce, max_steps=2, seed=seed),
                         str(tmp_path / reduce), progress=False)
        assert s["final"]["masks"] == 4 and np.isfinite(s["final"]["dice"])


def test_authors_pth_loads_like_our_folder(tmp_path):
    seed = fresh_seed() % 1000
    pipe = tiny_sd3_pipeline(t5=False, seed=seed)
    add_magnet_lora(pipe.transformer, rank=4, alpha=4)
    g = torch.Generator().manual_seed(seed)
    for n, p in pipe.transformer.named_parameters():
        if "lora_" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.1
    ours = save_magnet_lora(str(tmp_path / "ours"), pipe.transformer)
    model = {f"backbone.transformer.{k.replace('.weight', '.default.weight')}": v
             for k, v in lora_state_dict(pipe.transformer).items()}
    model["backbone.other.weight"] = torch.zeros(1)  # not LoRA: ignored
    torch.save({"model": model}, tmp_path / "authors.pth")
    a = load_magnet_lora(tiny_sd3_pipeline(t5=False, seed=seed), ours)
    b = load_magnet_lora(tiny_sd3_pipeline(t5=False, seed=seed), str(tmp_path / "authors.pth"))
    torch.testing.assert_close(_transformer_out(a, seed), _transformer_out(b, seed))
    torch.testing.assert_close(_transformer_out(a, seed), _transformer_out(pipe, seed), rtol=1e-4, atol=1e-5)
    torch.save({"model": {"x": torch.zeros(1)}}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="no LoRA weights"):
        load_magnet_lora(tiny_sd3_pipeline(t5=False), str(tmp_path / "bad.pth"))
    with pytest.raises(FileNotFoundError):
        load_magnet_lora(tiny_sd3_pipeline(t5=False), str(tmp_path / "missing"))


def test_bad_input_is_named(tmp_path):
    pipe = tiny_sd3_pipeline(t5=False)
    with pytest.raises(ValueError, match="out of range"):
        train_magnet(pipe, ShapesMagnetData(2), _cfg(layer=7), str(tmp_path / "a"), progress=False)
    with pytest.raises(ValueError, match="rank"):
        MagnetConfig(rank=0)
    with pytest.raises(ValueError, match="mixed_precision"):
        MagnetConfig(mixed_precision="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fp16"):
            train_magnet(pipe, ShapesMagnetData(2), _cfg(mixed_precision="fp16"), str(tmp_path / "b"), progress=False)


def test_unusable_samples_are_skipped_and_counted(tmp_path):
    class Bad(_Matched):
        def __getitem__(self, i):
            s = super().__getitem__(i)
            return MagnetSample(s.image, "", s.masks, None, key=s.key) if i % 2 else s

    s = train_magnet(tiny_sd3_pipeline(t5=False), Bad(4), _cfg(max_steps=2), str(tmp_path / "r"), progress=False)
    assert s["skipped"] == {"caption '' tokenizes to nothing": 2}
    assert s["totals"] == {"samples": 4, "masks": 4}  # the two good samples' two masks each
