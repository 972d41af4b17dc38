"""ShapesWorld: a synthetic world of coloured shapes and a tiny SD3 pipeline trained on it (issue #4).

- :mod:`.world`: :class:`ShapesWorld` scenes (image, caption, classes, label map, masks), :data:`CLASSES`.
- :mod:`.pipeline`: :func:`build_pipeline` (a real ``StableDiffusion3Pipeline`` from a config),
  :func:`load_shapes_pipeline` / :func:`save_pipeline` (the package's ``weights/`` folder).
- :mod:`.train`: ``python -m seg4diff_fast.shapes.train --out DIR`` (flow matching, resumable, grounding
  tracked per block at every checkpoint).
"""

from .shipped import EXPERT_LAYER, SIZE, T5_LENGTH, WEIGHTS_DIR
from .world import BACKGROUND, CLASSES, COLORS, SHAPES, WORDS, Scene, ShapesWorld, caption_for

__all__ = [
    "BACKGROUND",
    "CLASSES",
    "COLORS",
    "SHAPES",
    "WORDS",
    "Scene",
    "ShapesWorld",
    "caption_for",
    "ShapesConfig",
    "build_pipeline",
    "load_shapes_pipeline",
    "save_pipeline",
    "WEIGHTS_DIR",
    "EXPERT_LAYER",
    "T5_LENGTH",
    "SIZE",
]


def __getattr__(name: str):  # the pipeline part imports torch/diffusers: load it lazily
    if name in ("ShapesConfig", "build_pipeline", "load_shapes_pipeline", "save_pipeline", "load_pipeline"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
