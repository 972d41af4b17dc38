"""``MagnetConfig``: every setting of a MAGNET run, defaulting to the method (SEG4DIFF.md, "MAGNET")."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["MagnetConfig", "PROTOCOLS"]

_PRECISIONS = ("no", "fp16", "bf16")
#: ``"paper"``: train as the authors' code does (docs/PAPER_PROTOCOL_MAGNET.md); ``"corrected"``: this package's
#: own choices where it departs from them.
PROTOCOLS = ("paper", "corrected")
_FOCAL_FORMS = ("standard", "authors")
#: keys a run's ``magnet_config.json`` holds beside the settings (not settings: ``from_dict`` skips them)
_RECORD_KEYS = ("provenance",)


@dataclass
class MagnetConfig:
    """MAGNET fine-tuning settings. Defaults follow the authors' COCO config; departures are options.

    Attributes:
        protocol: ``"paper"`` (default; SD3 only, the family the authors trained): the authors' training, point
            by point (their data layouts and transform chains with a seeded RNG, full class names located with
            ``isin``, every head × all 77 positions as SA-1B candidates, their focal form in the matching cost
            and the loss, the conv head on each token map with PyTorch's default init); ``"corrected"``: this
            package's choices (docs/PAPER_PROTOCOL_MAGNET.md has the table and the reasons).
        layer: the expert block whose image→text scores get the mask loss (None: the model's default —
            9 for SD3, :data:`seg4diff_fast.shapes.EXPERT_LAYER` for the embedded pipeline).
        rank, alpha: LoRA rank and alpha (16, 16), gaussian init, on ``target_modules`` of every block (None: the
            model family's: ``to_q``, ``to_k``, ``to_v``, ``to_out.0``, and Flux.2's fused ``to_qkv_mlp_proj``).
        lambda_fm, lambda_focal, lambda_dice: loss weights (1.0, 0.1, 0.2).
        focal_alpha, focal_gamma, focal_form: sigmoid focal loss (0.25, 2; the form ``"standard"`` or
            ``"authors"``, the raw logit in the modulating factor; None: the protocol's, ``"authors"`` under
            paper, ``"standard"`` under corrected).
        head_reduce: how the layer's heads make predictions for matched (SA-1B-style) data: ``"none"``
            (every head's every caption token is a candidate, the authors') or ``"mean"``. Direct
            (COCO-style) data always uses the head mean.
        match_focal_weight, match_dice_weight: Hungarian cost weights (0.02, 1.0).
        match_focal_form: the focal form of the matching cost (None: the protocol's, as ``focal_form``).
        conv_head: train the small residual conv head on the maps (3×3, 1→64→64→1), saved beside the LoRA
            (paper: on every token map before the class mean, default init; corrected: on the class means,
            last conv zero-initialised).
        lr, weight_decay, warmup_steps, max_steps: AdamW with linear warm-up then cosine decay.
        batch_size, grad_accum: images per device per micro-step, micro-steps per optimizer step.
        max_grad_norm: full-model gradient-norm clip (authors: 0.01; None: off).
        resolution: side the images are stretched to (None: 1024, or the world size for ShapesWorld data).
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"`` (autocast; LoRA weights stay float32).
        gradient_checkpointing: recompute each block in backward (less memory, ~30 % more time).
        logit_mean, logit_std: logit-normal timestep sampling (0, 0.5 in the authors' code).
        t5_length: zero T5 positions after the 77 CLIP ones (None: the model's default; 77 for SD3).
        seed: everything random (init, data order, noise) derives from it and the step: exact resume.
        checkpoint_every, log_every: steps between checkpoints / log lines.
        num_workers: DataLoader workers preparing images and masks (None: the commands' plan,
            :func:`seg4diff_fast.utils.parallel.plan_parallelism`: 0 on <= 2 cores, else min(4, cores // 4);
            the run's ``magnet_config.json`` records the number used).
        backend: ``joint_attention`` backend (None: best available).
    """

    layer: int | None = None
    protocol: str = "paper"
    rank: int = 16
    alpha: float = 16.0
    target_modules: tuple[str, ...] | None = None
    lambda_fm: float = 1.0
    lambda_focal: float = 0.1
    lambda_dice: float = 0.2
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    focal_form: str | None = None
    head_reduce: str = "none"
    match_focal_weight: float = 0.02
    match_dice_weight: float = 1.0
    match_focal_form: str | None = None
    conv_head: bool = True
    lr: float = 1e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 500
    max_steps: int = 3000
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float | None = 0.01
    resolution: int | None = None
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    logit_mean: float = 0.0
    logit_std: float = 0.5
    t5_length: int | None = None
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 10
    num_workers: int | None = None
    backend: str | None = None

    def __post_init__(self) -> None:
        if self.target_modules is not None:
            self.target_modules = tuple(self.target_modules)
        checks = [
            (self.rank >= 1, f"rank must be >= 1, got {self.rank}"),
            (self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.mixed_precision in _PRECISIONS, f"mixed_precision must be one of {_PRECISIONS}, "
                                                  f"got {self.mixed_precision!r}"),
            (self.head_reduce in ("none", "mean"), f"head_reduce must be 'none' or 'mean', got {self.head_reduce!r}"),
            (self.protocol in PROTOCOLS, f"protocol must be 'paper' or 'corrected', got {self.protocol!r}"),
            (self.focal_form is None or self.focal_form in _FOCAL_FORMS,
             f"focal_form must be 'standard', 'authors' or None, got {self.focal_form!r}"),
            (self.match_focal_form is None or self.match_focal_form in _FOCAL_FORMS,
             f"match_focal_form must be 'standard', 'authors' or None, got {self.match_focal_form!r}"),
            (self.resolution is None or self.resolution > 0, f"resolution must be > 0, got {self.resolution}"),
            (self.num_workers is None or self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}"),
            (min(self.lambda_fm, self.lambda_focal, self.lambda_dice) >= 0, "loss weights must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"MagnetConfig: {msg}")

    @property
    def paper(self) -> bool:
        """True under ``protocol="paper"``."""
        return self.protocol == "paper"

    @property
    def loss_focal_form(self) -> str:
        """The focal form of the mask loss: ``focal_form``, or the protocol's when None."""
        return self.focal_form or ("authors" if self.paper else "standard")

    @property
    def cost_focal_form(self) -> str:
        """The focal form of the Hungarian matching cost: ``match_focal_form``, or the protocol's when None."""
        return self.match_focal_form or ("authors" if self.paper else "standard")

    def to_dict(self) -> dict[str, Any]:
        """Every setting, the focal forms resolved (what the run used).

        Example:
            >>> d = MagnetConfig(protocol="corrected").to_dict()
            >>> d["protocol"], d["focal_form"], d["match_focal_form"]
            ('corrected', 'standard', 'standard')
        """
        d = dataclasses.asdict(self)
        d["target_modules"] = None if self.target_modules is None else list(self.target_modules)
        d["focal_form"], d["match_focal_form"] = self.loss_focal_form, self.cost_focal_form
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MagnetConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        if not d.get("extra", True):  # configs saved by 0.1.0 carry an always-empty "extra"
            d = {k: v for k, v in d.items() if k != "extra"}
        d = {k: v for k, v in d.items() if k not in _RECORD_KEYS}  # magnet_config.json: the run's provenance
        if "protocol" not in d:  # saved before protocols existed: those runs were what is now "corrected"
            d = {**d, "protocol": "corrected"}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"MagnetConfig: unknown settings {unknown}")
        return cls(**d)
