"""The registry of model families: which adapter reads which pipeline, by object or by class name.

Families are tried in order; :func:`register_family` puts a new adapter first. ``model_index.json``'s
``_class_name`` picks the family of a folder before anything is loaded (:func:`family_for_class`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .family import ModelFamily
from .flux import FluxFamily
from .flux2 import Flux2Family
from .qwenimage import QwenImageFamily
from .sd3 import SD3Family

__all__ = ["FAMILIES", "family_for_class", "family_named", "family_of", "register_family", "supported_pipelines"]

#: The registered families, tried in order by :func:`family_of`.
FAMILIES: list[ModelFamily] = [SD3Family(), FluxFamily(), Flux2Family(), QwenImageFamily()]


def register_family(family: ModelFamily) -> None:
    """Add a family adapter (tried before the ones already registered)."""
    FAMILIES.insert(0, family)


def supported_pipelines(families: Sequence[ModelFamily] | None = None) -> str:
    """The supported pipelines, for messages."""
    return "; ".join(f.pipelines for f in (families or FAMILIES))


def family_of(pipe: Any) -> ModelFamily:
    """The family adapter serving ``pipe``.

    Raises:
        TypeError: no registered family serves it (the message lists the supported pipelines).

    Example:
        >>> from seg4diff_fast.testing import tiny_flux_pipeline, tiny_sd3_pipeline
        >>> family_of(tiny_sd3_pipeline(t5=False)).name, family_of(tiny_flux_pipeline()).name
        ('sd3', 'flux')
    """
    for family in FAMILIES:
        if family.matches(pipe):
            return family
    raise TypeError(f"reading attention maps needs a pipeline of a supported MM-DiT family ({supported_pipelines()}); "
                    f"got {type(pipe).__name__}")


def family_named(name: str) -> ModelFamily:
    """The family called ``name`` (``"sd3"``, ``"flux"``, ``"flux2"``, ``"qwenimage"``).

    Raises:
        ValueError: no such family (the message lists the names).
    """
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"unknown model family {name!r}; choose one of {', '.join(f.name for f in FAMILIES)}")


def family_for_class(class_name: str) -> ModelFamily:
    """The family that loads pipelines of class ``class_name`` (``model_index.json``'s ``_class_name``).

    Raises:
        ValueError: an unsupported pipeline class (the message lists the supported ones).

    Example:
        >>> family_for_class("FluxPipeline").name
        'flux'
    """
    for family in FAMILIES:
        if class_name in family.pipeline_classes:
            return family
    supported = ", ".join(c for f in FAMILIES for c in f.pipeline_classes)
    raise ValueError(f"{class_name} is not a supported pipeline; supported: {supported}")
