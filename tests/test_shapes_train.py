"""ShapesWorld pipeline and training: design invariants, checkpoint/resume, the stock loader, the segmenter."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from seg4diff_fast.shapes import WORDS, ShapesWorld
from seg4diff_fast.shapes.pipeline import ShapesConfig, build_pipeline, save_pipeline
from seg4diff_fast.shapes.train import evaluate_grounding, heldout_scenes, train

TINY = ShapesConfig(num_layers=2, heads=2, head_dim=8, text_dim=16, vae_channels=8, t5_length=8, clip_length=16)
KW = {"batch": 4, "vae_steps": 2, "eval_scenes": 6, "progress": False, "vae_stat_images": 8, "vae_batch": 4,
      "lr_schedule": "cosine", "warmup": 1}


def test_world_words_are_single_tokens_and_states_are_unmixed():
    pipe = build_pipeline(TINY)
    for w in WORDS:
        assert len(pipe.tokenizer(w, add_special_tokens=False).input_ids) == 1, w
    assert pipe.tokenizer.get_vocab() == pipe.tokenizer_2.get_vocab()
    ids = pipe.tokenizer("red circle on background", padding="max_length", max_length=16,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        pe, _, _, _ = pipe.encode_prompt("red circle on background", None, None, device="cpu",
                                         do_classifier_free_guidance=False, max_sequence_length=8)
        emb = pipe.text_encoder.text_model.embeddings
        ref = emb.token_embedding.weight[ids[0]] + emb.position_embedding.weight[:16]
    assert pe.shape == (1, 16 + 8, 2 * TINY.text_dim)
    torch.testing.assert_close(pe[0, :16, : TINY.text_dim], ref)  # token + position, no causal mixing
    assert torch.count_nonzero(pe[0, 16:]) == 0  # zero T5 positions


def test_pooled_text_has_no_effect():
    pipe = build_pipeline(TINY)
    tr = pipe.transformer.eval()
    x = torch.randn(2, 4, 32, 32)
    enc = torch.randn(2, 24, 32)
    with torch.no_grad():
        a = tr(x, timestep=torch.tensor([300.0, 700.0]), encoder_hidden_states=enc,
               pooled_projections=torch.randn(2, 32)).sample
        b = tr(x, timestep=torch.tensor([300.0, 700.0]), encoder_hidden_states=enc,
               pooled_projections=torch.zeros(2, 32)).sample
    assert torch.equal(a, b)
    assert not any(p.requires_grad for p in tr.time_text_embed.text_embedder.parameters())


def test_default_pipeline_fits_the_budget(tmp_path):
    pipe = build_pipeline(ShapesConfig())
    assert pipe.vae_scale_factor == 1 and pipe.tokenizer_max_length == 77
    n = sum(p.numel() for p in pipe.transformer.parameters())
    assert n <= 3_000_000
    save_pipeline(pipe, str(tmp_path / "p"), ShapesConfig())
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp_path / "p") for f in fs)
    assert total <= 20 * 2**20


def test_lr_schedule():
    from seg4diff_fast.shapes.train import lr_at

    assert lr_at(0, 100, 1.0, "cosine", warmup=10) == pytest.approx(0.1)
    assert lr_at(10, 100, 1.0, "cosine", warmup=10) == pytest.approx(1.0)
    assert lr_at(55, 100, 1.0, "cosine", warmup=10, min_ratio=0.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 1.0, "cosine", warmup=10, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(70, 100, 1.0) == 1.0


def _flat(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def test_train_checkpoint_resume_and_load(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train(full, steps=4, ckpt_every=2, config=TINY, evaluate=True, **KW)
    train(part, steps=4, stop_after=2, ckpt_every=2, config=TINY, evaluate=False, save_pipeline_every_ckpt=False,
          **KW)  # an interrupted run
    train(part, steps=4, ckpt_every=2, resume=True, evaluate=False, save_pipeline_every_ckpt=False, **KW)
    a = torch.load(os.path.join(full, "checkpoint.pt"), weights_only=False)
    b = torch.load(os.path.join(part, "checkpoint.pt"), weights_only=False)
    assert a["step"] == b["step"] == 4
    for key in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        sa, sb = _flat(a[key]), _flat(b[key])
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=f"{key}.{k}")
    assert torch.equal(a["gen"], b["gen"])  # the noise stream resumed where it was

    log = [json.loads(line) for line in open(os.path.join(full, "log.jsonl"))]
    evals = [r for r in log if r.get("stage") == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert len(r["B"]) == TINY.num_layers and all(0 <= v <= 100 for v in r["B"])
        assert "loss_caption" in r and "loss_empty" in r
    assert any(r.get("stage") == "vae_done" for r in log)
    assert os.path.isfile(os.path.join(full, "best", "model_index.json"))

    # the saved pipeline loads with the stock class and segments with the stock segmenter
    from diffusers import StableDiffusion3Pipeline

    from seg4diff_fast import Seg4DiffSegmenter

    pipe = StableDiffusion3Pipeline.from_pretrained(os.path.join(full, "pipeline"), text_encoder_3=None,
                                                    tokenizer_3=None, image_encoder=None, feature_extractor=None)
    sd = pipe.transformer.state_dict()
    for k, v in a["transformer"].items():
        torch.testing.assert_close(sd[k], v)
    assert pipe.vae.config.scaling_factor == pytest.approx(a["vae_scale"])
    scene = ShapesWorld(3).sample()
    seg = Seg4DiffSegmenter(pipe, layer=1, resolution=32, t5_length=TINY.t5_length)
    res = seg(scene.image, classes=scene.classes)
    assert res.label_map.shape == (32, 32) and res.label_map.max() < len(scene.classes)
    img = pipe(scene.caption, num_inference_steps=2, height=32, width=32, max_sequence_length=TINY.t5_length,
               generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (32, 32)


def test_grounding_baselines_match_a_direct_count():
    """evaluate_grounding's B baseline (all background) against a hand computation of the mIoU."""
    pipe = build_pipeline(TINY)
    scenes = heldout_scenes(6, 32)
    r = evaluate_grounding(pipe, scenes, 32, TINY.t5_length, batch_size=6)
    bg = sum(int((s.label_map == 0).sum()) for s in scenes)
    total = sum(s.label_map.size for s in scenes)
    n_present = len({c for s in scenes for c in s.classes})
    assert r["B_baseline"] == pytest.approx(100.0 * bg / total / n_present, abs=0.01)
    assert r["n_A"] == sum(len(s.classes) >= 3 for s in scenes)
    assert len(r["A"]) == len(r["B"]) == TINY.num_layers
    assert np.isfinite(r["A_baseline"])


def test_protocol_a_split_by_shared_colour_equals_evaluating_each_part_alone():
    pipe = build_pipeline(TINY)
    scenes = heldout_scenes(40, 32)
    r = evaluate_grounding(pipe, scenes, 32, TINY.t5_length, batch_size=8)
    a_scenes = [s for s in scenes if len(s.classes) >= 3]
    for key, distinct in (("A_distinct_colours", True), ("A_shared_colour", False)):
        part = [s for s in a_scenes
                if (len({c.split()[0] for c in s.object_classes}) == len(s.object_classes)) == distinct]
        assert r[f"n_{key}"] == len(part) > 0
        alone = evaluate_grounding(pipe, part, 32, TINY.t5_length, batch_size=8)
        assert r[key] == pytest.approx(alone["A"], abs=0.02)  # the same scenes scored on their own
    assert r["n_A_distinct_colours"] + r["n_A_shared_colour"] == r["n_A"]


def _named_objects(caption: str) -> list[str]:
    """The objects a caption names: "colour shape" or a bare "shape" (glue words and background skipped)."""
    from seg4diff_fast.shapes import COLORS, SHAPES

    words, out, i = caption.split(), [], 0
    while i < len(words):
        if words[i] in COLORS:
            assert words[i + 1] in SHAPES, caption
            out.append(f"{words[i]} {words[i + 1]}")
            i += 2
            continue
        if words[i] in SHAPES:
            out.append(words[i])
        i += 1
    return out


@pytest.mark.parametrize("style", ["mixed", "varied"])
def test_training_captions_name_exactly_the_scene_objects(style):
    from seg4diff_fast.shapes.train import training_caption

    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    forms, bare = set(), 0
    for seed in range(300):
        s = ShapesWorld(seed).sample()
        assert training_caption(s, rng, "world") == s.caption
        cap = training_caption(s, rng, style)
        words = cap.split()
        assert set(words) <= set(WORDS)
        named = _named_objects(cap)
        # each object named once, in full or (varied) by its shape alone
        remaining = list(s.object_classes)
        for n in sorted(named, key=lambda x: -len(x)):  # full names first, then bare shapes
            match = n if n in remaining else next((o for o in remaining if o.split()[1] == n), None)
            assert match is not None and (style == "varied" or match == n), (cap, s.object_classes)
            bare += match != n
            remaining.remove(match)
        assert not remaining, (cap, s.object_classes)
        forms.add("sentence" if cap.endswith(" on background") else
                  "list+background" if "background" in words else "list")
    assert forms == {"sentence", "list+background", "list"}
    assert (bare > 0) == (style == "varied")
    with pytest.raises(ValueError, match="caption style"):
        training_caption(ShapesWorld(0).sample(), rng, "poetry")


def test_two_layer_text_encoder_mixes_words_causally():
    """text_layers=2: a word's state (hidden_states[-2]) depends on the words before it, never after."""
    import dataclasses

    pipe = build_pipeline(dataclasses.replace(TINY, text_layers=2))
    assert any(p.requires_grad for p in pipe.text_encoder.text_model.encoder.layers[0].parameters())
    assert not any(p.requires_grad for p in pipe.text_encoder.text_model.encoder.layers[-1].parameters())

    def states(prompt):
        with torch.no_grad():
            return pipe.encode_prompt(prompt, None, None, device="cpu", do_classifier_free_guidance=False,
                                      max_sequence_length=8)[0][0]

    a, b = states("red circle on background"), states("blue circle on background")
    c = states("red square on background")
    torch.testing.assert_close(a[:2], c[:2])  # BOS and "red" do not see the next word
    assert not torch.allclose(a[2], b[2])  # "circle" sees its colour
