"""Does an image token know its object's shape? A linear probe on the image tokens entering a block.

A colour is in every patch; a shape is a property of the whole blob. For a block's word maps to tell two objects of
one colour apart by their shape words, the image tokens entering it must carry the shape. This measures it: the
image tokens entering each block (the reader's noised latents, the scene's object classes as the prompt) are
captured with forward pre-hooks, tokens whose pixels all lie in one object are labelled with its shape, and a
multinomial logistic regression fitted on one set of scenes is scored on another.

    python -m seg4diff_fast.shapes.probe PIPELINE_DIR --shape-probe

Example:
    >>> from seg4diff_fast.shapes import ShapesWorld, load_shapes_pipeline
    >>> pipe = load_shapes_pipeline(device="cpu")
    >>> train = [ShapesWorld(10_000 + i).sample() for i in range(6)]
    >>> test = [ShapesWorld(i).sample() for i in range(4)]
    >>> r = shape_probe(pipe, train, test, blocks=(1,))
    >>> r["blocks"], 0 <= r["accuracy"][0] <= 100
    ([1], True)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .grounding import _scene_rows
from .world import SHAPES, Scene

__all__ = ["block_inputs", "fit_linear_probe", "shape_probe", "token_shapes"]

#: label of a token that is not wholly inside one object
MIXED = -1


def token_shapes(scene: Scene, side: int) -> np.ndarray:
    """Per image token (row-major, ``side`` × ``side``): the index in :data:`SHAPES` of the object whose pixels
    cover the token's whole patch, else :data:`MIXED` (background, or an edge between two regions)."""
    size = scene.label_map.shape[0]
    if size % side:
        raise ValueError(f"token grid {side} does not divide the scene side {size}")
    p = size // side
    patches = scene.label_map.reshape(side, p, side, p).transpose(0, 2, 1, 3).reshape(side * side, p * p)
    first = patches[:, 0]
    pure = (patches == first[:, None]).all(1) & (first > 0)
    shape_of = np.array([MIXED] + [SHAPES.index(c.split()[-1]) for c in scene.classes[1:]])
    return np.where(pure, shape_of[first], MIXED)


@torch.no_grad()
def block_inputs(pipe: Any, scenes: Sequence[Scene], blocks: Sequence[int], *, batch_size: int = 16,
                 seed: int = 0) -> dict[int, torch.Tensor]:
    """The image tokens entering each of ``blocks``, float32 (scenes, tokens, dim), read as the segmenter reads:
    the reader's noised latents (its seed, noise step and resolution), the scene's object classes as the prompt
    (``"background"`` for a scene without objects). The pass stops after the last block asked for."""
    from ..reader import PipelineReader

    reader = PipelineReader(pipe, seed=seed)
    blocks = list(reader.check_layers(list(blocks)))
    got: dict[int, list[torch.Tensor]] = {b: [] for b in blocks}

    def keep(block: int) -> Any:
        def hook(_module: Any, args: tuple, kwargs: dict) -> None:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            got[block].append(hidden.detach().float().cpu())
        return hook

    layers = reader.transformer.transformer_blocks
    handles = [layers[b].register_forward_pre_hook(keep(b), with_kwargs=True) for b in blocks]
    try:  # one row per scene, in order: the hooks see the scenes' tokens in order
        for _ in _scene_rows(reader, list(scenes), lambda s: [("objects", list(s.object_classes) or ["background"])],
                             (max(blocks),), "mean", batch_size):
            pass
    finally:
        for h in handles:
            h.remove()
    return {b: torch.cat(v) for b, v in got.items()}


def fit_linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, classes: int,
                     steps: int = 400, lr: float = 0.05, seed: int = 0) -> torch.Tensor:
    """Multinomial logistic regression (features standardised with the training set's statistics, full-batch
    Adam) fitted on ``(x_train, y_train)``; returns the predicted class of each row of ``x_test``."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    xt, xs = (x_train - mean) / std, (x_test - mean) / std
    gen = torch.Generator().manual_seed(seed)
    w = (0.01 * torch.randn(xt.shape[1], classes, generator=gen)).requires_grad_()
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(xt @ w + b, y_train).backward()
            opt.step()
    with torch.no_grad():
        return (xs @ w + b).argmax(1)


def _shared_colour(scene: Scene) -> bool:
    colours = [c.split()[0] for c in scene.object_classes]
    return len(set(colours)) < len(colours)


def shape_probe(pipe: Any, train: Sequence[Scene], test: Sequence[Scene], blocks: Sequence[int] = (0, 1, 2),
                *, batch_size: int = 16, seed: int = 0) -> dict[str, Any]:
    """Accuracy (%) of a linear probe that reads an object's shape from the image tokens entering each block,
    fitted on ``train`` and scored on the tokens of ``test`` wholly inside one object.

    Returns:
        ``{"blocks", "accuracy": [per block], "accuracy_shared_colour": [per block, on the test scenes where two
        objects share a colour], "chance": the test share of the training set's most frequent shape,
        "n_train_tokens", "n_test_tokens", "n_test_shared_tokens"}``.
    """
    train, test = list(train), list(test)
    feats = {name: block_inputs(pipe, scenes, blocks, batch_size=batch_size, seed=seed)
             for name, scenes in (("train", train), ("test", test))}
    side = int(round(next(iter(feats["test"].values())).shape[1] ** 0.5))
    labels = {name: np.concatenate([token_shapes(s, side) for s in scenes])
              for name, scenes in (("train", train), ("test", test))}
    shared = np.concatenate([np.full(side * side, _shared_colour(s)) for s in test])
    keep = {name: labels[name] != MIXED for name in labels}
    if not keep["train"].any() or not keep["test"].any():
        raise ValueError("shape_probe: no token lies wholly inside an object; give scenes with objects")
    y_train = torch.as_tensor(labels["train"][keep["train"]])
    y_test = labels["test"][keep["test"]]
    on_shared = shared[keep["test"]]
    out: dict[str, Any] = {"blocks": [int(b) for b in feats["test"]], "accuracy": [], "accuracy_shared_colour": []}
    for b in out["blocks"]:
        x_train = feats["train"][b].reshape(-1, feats["train"][b].shape[-1])[torch.as_tensor(keep["train"])]
        x_test = feats["test"][b].reshape(-1, feats["test"][b].shape[-1])[torch.as_tensor(keep["test"])]
        right = fit_linear_probe(x_train, y_train, x_test, len(SHAPES), seed=seed).numpy() == y_test
        out["accuracy"].append(round(100.0 * float(right.mean()), 2))
        out["accuracy_shared_colour"].append(round(100.0 * float(right[on_shared].mean()), 2) if on_shared.any()
                                             else float("nan"))
    out["chance"] = round(100.0 * float((y_test == np.bincount(y_train.numpy()).argmax()).mean()), 2)
    out.update(n_train_tokens=int(keep["train"].sum()), n_test_tokens=int(keep["test"].sum()),
               n_test_shared_tokens=int(on_shared.sum()))
    return out
