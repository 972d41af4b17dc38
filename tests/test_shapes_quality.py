"""The shipped ShapesWorld pipeline: zero-shot quality at the expert layer (protocols A and B beside their
trivial baselines, on held-out scenes), a stable expert layer, generation that follows the caption, and a
short MAGNET run on a weak block (mask loss falls, that block's mIoU rises).

Thresholds sit below the values measured on the shipped weights (README, "ShapesWorld"), with margin."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from seg4diff_fast.shapes import EXPERT_LAYER, SIZE, T5_LENGTH
from seg4diff_fast.shapes.train import evaluate_grounding, heldout_scenes

# measured on the shipped weights with 200 held-out scenes (README, "ShapesWorld"): A 79.8, B 34.2, A on the
# scenes whose objects differ in colour 90.8 and on those where two share one 63.7 (the flat world's model had
# 44.3 there); each threshold is that minus a margin
MIN_A, MIN_B, MIN_A_DISTINCT, MIN_A_SHARED = 72.0, 28.0, 84.0, 55.0
# the shipped MAGNET LoRA on the expert block, 64 held-out scenes (measured values in the tests' docstrings)
MIN_MAGNET_A, MIN_MAGNET_A_LIFT, MIN_MAGNET_B, MIN_MAGNET_B_LIFT, MIN_SHAPE_WORD_LIFT = 86.0, 5.0, 68.0, 30.0, 3.0
WEAK_LAYER = 2  # a block that grounds poorly zero-shot (A 37.8, B 27.2): MAGNET's target


@pytest.fixture(scope="module")
def pipe():
    from seg4diff_fast.shapes import load_shapes_pipeline

    return load_shapes_pipeline()


@pytest.fixture(scope="module")
def sweep(pipe):
    torch.set_num_threads(1)  # a tiny model: threads only add overhead
    return evaluate_grounding(pipe, heldout_scenes(200, SIZE), SIZE, t5_length=T5_LENGTH)


def test_zero_shot_quality_at_the_expert_layer(sweep):
    assert sweep["n_A"] >= 100 and sweep["n_B"] == 200
    a, b = sweep["A"][EXPERT_LAYER], sweep["B"][EXPERT_LAYER]
    assert a >= MIN_A and a >= sweep["A_baseline"] + 25, (a, sweep["A_baseline"])
    assert b >= MIN_B and b >= sweep["B_baseline"] + 20, (b, sweep["B_baseline"])
    # where two objects share a colour only the shape words tell them apart: they ground (the flat world's
    # model stayed at 44.3 there, a random pick between the two objects), if less well than a colour
    assert sweep["n_A_distinct_colours"] >= 80 and sweep["n_A_shared_colour"] >= 40
    assert sweep["A_distinct_colours"][EXPERT_LAYER] >= MIN_A_DISTINCT, sweep["A_distinct_colours"]
    assert sweep["A_shared_colour"][EXPERT_LAYER] >= MIN_A_SHARED, sweep["A_shared_colour"]


def test_expert_layer_is_the_sweep_best_and_stable_across_seeds_and_scene_sets(pipe, sweep):
    """The best block for protocol A and for protocol B is EXPERT_LAYER on the fixed held-out set, and again
    for 3 noise seeds on each of 2 disjoint scene sets (the held-out seeds and seeds from 100 000). Measured
    on 200 scenes a set (README, "ShapesWorld"): block 1 wins all 12 picks, ≥ 22 points of A ahead of block 3
    and ≥ 6 of B ahead of blocks 2 and 4."""
    from seg4diff_fast.shapes import ShapesWorld
    from seg4diff_fast.shapes.grounding import layer_stability

    assert int(np.argmax(sweep["A"])) == EXPERT_LAYER and int(np.argmax(sweep["B"])) == EXPERT_LAYER
    sets = [heldout_scenes(64, SIZE), [ShapesWorld(100_000 + i, SIZE).sample() for i in range(64)]]
    r = layer_stability(pipe, sets, seeds=(0, 1, 2), t5_length=T5_LENGTH)
    assert len(r["runs"]) == 6 and r["stable"] and r["best_A"] == r["best_B"] == [EXPERT_LAYER], r


def test_colour_and_shape_words_ground(pipe):
    """A colour word's map alone finds its object (measured 86.4 % of object pixels on 200 scenes, chance 43 %),
    and so does a shape word's (87.3 %, chance 40 %; 51.2 % on the flat world, where a shape is visible only in
    an object's outline). Thresholds: both far above chance."""
    from seg4diff_fast.shapes.grounding import word_grounding

    w = word_grounding(pipe, heldout_scenes(96, SIZE), EXPERT_LAYER, t5_length=T5_LENGTH)
    assert w["n_colour_scenes"] >= 30 and w["n_shape_scenes"] >= 50
    assert w["colour"] >= 75 and w["colour"] >= w["colour_chance"] + 30, w
    assert w["shape"] >= 75 and w["shape"] >= w["shape_chance"] + 30, w


@pytest.fixture(scope="module")
def shipped_lora():
    """The shipped MAGNET LoRA measured as a user loads it (a fresh pipeline, ``load_magnet_lora``), on 64
    held-out scenes, with 8 generated images each side."""
    from seg4diff_fast.magnet.shapes_check import lora_check
    from seg4diff_fast.shapes.shipped import MAGNET_LORA_DIR

    torch.set_num_threads(1)
    return lora_check(MAGNET_LORA_DIR, scenes=64, generate=8)


def test_shipped_magnet_lora_lifts_the_expert_block(shipped_lora):
    """MAGNET on the expert block itself (README, "MAGNET fine-tuning", 200 held-out scenes: A 79.8 → 91.3, B
    34.2 → 75.9, the issue's A ≥ 90 and B ≥ 75; on these 64 scenes A 81.6 → 91.2, B 35.5 → 75.7, flow-matching
    loss +4.6 %, a shape word alone picks its object 88.1 → 94.7 % of object pixels): A and B rise by margins no
    noise gives (the seed-to-seed spread is about 1.5 points), the flow-matching loss stays within the issue's
    +5 % (same σ and noise before and after, so the change is deterministic), and the shape words ground better."""
    r = shipped_lora
    assert r["layer"] == EXPERT_LAYER
    b0, b1 = r["before"]["B"][EXPERT_LAYER], r["after"]["B"][EXPERT_LAYER]
    a0, a1 = r["before"]["A"][EXPERT_LAYER], r["after"]["A"][EXPERT_LAYER]
    assert b1 >= MIN_MAGNET_B and b1 >= b0 + MIN_MAGNET_B_LIFT, (b0, b1)
    assert a1 >= MIN_MAGNET_A and a1 >= a0 + MIN_MAGNET_A_LIFT, (a0, a1)
    assert r["fm_loss_change"] <= 0.05, r["fm_loss_change"]
    assert r["after"]["words"]["shape"] >= r["before"]["words"]["shape"] + MIN_SHAPE_WORD_LIFT, (
        r["before"]["words"], r["after"]["words"])


def test_generation_follows_the_caption_with_and_without_the_lora(shipped_lora):
    """The caption's colour is the dominant colour inside the generated object's own mask (chance 0.25)."""
    for when in ("before", "after"):
        assert shipped_lora[when]["gen_mask_colour_acc"] >= 0.75, (when, shipped_lora[when])


def test_magnet_short_run_lifts_a_weak_block(tmp_path):
    """A short MAGNET run on block WEAK_LAYER: the mask loss falls and that block's mIoU rises."""
    from seg4diff_fast.magnet import MagnetConfig, ShapesMagnetData, train_magnet
    from seg4diff_fast.shapes import load_shapes_pipeline

    torch.set_num_threads(1)
    pipe = load_shapes_pipeline()
    scenes = heldout_scenes(64, SIZE)
    before = evaluate_grounding(pipe, scenes, SIZE, t5_length=T5_LENGTH)
    cfg = MagnetConfig(layer=WEAK_LAYER, max_steps=150, batch_size=16, lr=3e-3, warmup_steps=5, resolution=SIZE,
                       log_every=1, checkpoint_every=1000, seed=0)
    train_magnet(pipe, ShapesMagnetData(2000, include_background=True), cfg, str(tmp_path), progress=False)
    log = [json.loads(line) for line in open(os.path.join(tmp_path, "log.jsonl"))]
    mask = [r["focal"] * 0.1 + r["dice"] * 0.2 for r in log]
    assert np.mean(mask[-10:]) < 0.85 * np.mean(mask[:10]), (mask[:10], mask[-10:])  # measured 0.73×
    after = evaluate_grounding(pipe, scenes, SIZE, t5_length=T5_LENGTH)
    lift = after["B"][WEAK_LAYER] - before["B"][WEAK_LAYER]
    assert lift >= 8.0, (before["B"], after["B"])  # measured +15.6 (the 2000-step recipe in the README: +43.9)


def test_the_shipped_facts_and_the_plain_segmenter_call(pipe):
    """The weights carry the facts the package states, and the issue's plain call
    ``Seg4DiffSegmenter(load_shapes_pipeline(), layer=EXPERT_LAYER, resolution=SIZE)`` reads the model's own text
    layout and segments held-out scenes with either class list (measured on these 100 scenes: mIoU with
    background prompted 47, object pixels right with the object classes alone 89 %)."""
    from seg4diff_fast import MeanIoU, Seg4DiffSegmenter
    from seg4diff_fast.shapes import CLASSES, WEIGHTS_DIR

    with open(os.path.join(WEIGHTS_DIR, "shapes_config.json")) as f:
        cfg = json.load(f)
    assert (cfg["expert_layer"], cfg["t5_length"], cfg["size"]) == (EXPERT_LAYER, T5_LENGTH, SIZE)
    scenes = heldout_scenes(100, SIZE)
    seg = Seg4DiffSegmenter(pipe, layer=EXPERT_LAYER, resolution=SIZE)
    assert seg.t5_length == T5_LENGTH
    meter = MeanIoU(len(CLASSES))
    for r, s in zip(seg([s.image for s in scenes], classes=[s.classes for s in scenes]), scenes):
        meter.update(np.array([CLASSES.index(c) for c in s.classes])[r.label_map], s.global_label_map())
    res = seg([s.image for s in scenes], classes=[s.object_classes for s in scenes])
    fg = np.mean([(r.label_map + 1 == s.label_map)[s.label_map > 0].mean() for r, s in zip(res, scenes)])
    assert meter.compute()["mIoU"] >= 28 and fg >= 0.85, (meter.compute()["mIoU"], fg)


def test_shapes_check_command_pins_its_threads(tmp_path, capsys):
    """`python -m seg4diff_fast.magnet.shapes_check --lora DIR` (its real entry point, in-process): runs on
    --threads torch threads (default 1) and writes the before/after table and JSON; --threads 0 is refused."""
    from seg4diff_fast.magnet.shapes_check import main
    from seg4diff_fast.shapes.shipped import MAGNET_LORA_DIR

    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["--lora", MAGNET_LORA_DIR, "--scenes", "8", "--generate", "0", "--out", str(tmp_path)]) == 0
        assert torch.get_num_threads() == 1
        assert "| A after |" in capsys.readouterr().out
        r = json.load(open(tmp_path / "lora_check.json"))
        assert r["scenes"] == 8 and r["after"]["B"][EXPERT_LAYER] > r["before"]["B"][EXPERT_LAYER]
        with pytest.raises(SystemExit) as e:
            main(["--lora", MAGNET_LORA_DIR, "--threads", "0"])
        assert e.value.code == 2 and "--threads must be >= 1" in capsys.readouterr().err
    finally:
        torch.set_num_threads(saved)
