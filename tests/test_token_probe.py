"""The shape probe (seg4diff_fast.shapes.token_probe): labels from the scenes' own masks, the linear probe on
data whose answer is known, the captured block inputs against the transformer's own patch embedding."""

import numpy as np
import pytest
import torch

from seg4diff_fast.shapes import SHAPES, ShapesWorld, load_shapes_pipeline
from seg4diff_fast.shapes.token_probe import MIXED, block_inputs, fit_linear_probe, shape_probe, token_shapes


@pytest.fixture(scope="module")
def pipe():
    return load_shapes_pipeline(device="cpu")


@pytest.mark.parametrize("side", [16, 8, 32])
def test_token_shapes_from_the_visible_masks(side):
    """A token is labelled with an object's shape exactly when every pixel of its patch is in that object's
    visible mask (checked pixel by pixel from ``scene.masks``, not the label map)."""
    for seed in range(12):
        scene = ShapesWorld(seed).sample()
        labels = token_shapes(scene, side)
        p = 32 // side
        for t in range(side * side):
            r, c = divmod(t, side)
            want = MIXED
            for k, mask in enumerate(scene.masks):
                if mask[r * p:(r + 1) * p, c * p:(c + 1) * p].all():
                    want = SHAPES.index(scene.classes[k + 1].split()[-1])
            assert labels[t] == want, (seed, t)
    with pytest.raises(ValueError, match="does not divide"):
        token_shapes(ShapesWorld(0).sample(), 12)


def test_linear_probe_separates_what_is_separable_and_not_noise():
    gen = torch.Generator().manual_seed(1)
    centres = 4.0 * torch.randn(3, 16, generator=gen)
    y = torch.randint(0, 3, (3000,), generator=gen)
    x = centres[y] + torch.randn(3000, 16, generator=gen)
    pred = fit_linear_probe(x[:2000], y[:2000], x[2000:], 3)
    assert (pred == y[2000:]).float().mean() > 0.99
    noise = torch.randn(3000, 16, generator=gen)  # labels independent of the features: about 1/3 right
    acc = float((fit_linear_probe(noise[:2000], y[:2000], noise[2000:], 3) == y[2000:]).float().mean())
    assert 0.25 < acc < 0.42


def test_block_inputs_are_the_transformers_own_tokens(pipe):
    """Block 0's input is the patch embedding (with positions) of the reader's noised latents; block 1's is
    different (block 0 ran)."""
    from seg4diff_fast.reader import PipelineReader

    scenes = [ShapesWorld(i).sample() for i in range(5)]
    got = block_inputs(pipe, scenes, [0, 1], batch_size=3)
    reader = PipelineReader(pipe)
    with torch.no_grad():
        ref = pipe.transformer.pos_embed(reader.latents(reader.prepare([s.image for s in scenes])[0]))
    assert got[0].shape == ref.shape == (5, 256, 64)
    torch.testing.assert_close(got[0], ref.float(), rtol=0, atol=0)
    assert not torch.allclose(got[1], got[0])


def test_shape_probe_on_the_embedded_model(pipe):
    """The embedded model's tokens carry some shape by block 2 (200-scene measurement: 60 % against a
    majority-class chance of about 40 %; here a margin of 8 points on fewer scenes)."""
    train = [ShapesWorld(500_000 + i).sample() for i in range(60)]
    test = [ShapesWorld(i).sample() for i in range(40)]
    r = shape_probe(pipe, train, test, blocks=(0, 2))
    assert r["blocks"] == [0, 2]
    assert r["n_test_tokens"] == sum(int((token_shapes(s, 16) != MIXED).sum()) for s in test)
    assert all(0 <= a <= 100 for a in r["accuracy"]) and 20 < r["chance"] < 60
    assert r["accuracy"][1] > r["chance"] + 8
    assert np.isfinite(r["accuracy_shared_colour"]).all() and r["n_test_shared_tokens"] > 0
