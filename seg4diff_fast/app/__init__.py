"""``seg4diff-fast app``: an interactive web demo (Gradio) of segmentation and of words grounding in generation.

- :mod:`.logic`: pure functions, inputs → numpy images and dicts (:class:`~.logic.AppModel`,
  :func:`~.logic.segment`, :func:`~.logic.unsupervised`, :func:`~.logic.generate`,
  :func:`~.logic.layer_analysis`); no Gradio, testable without a server;
- :mod:`.ui`: the ``gr.Blocks`` layout over them (:func:`~.ui.build_app`), :func:`~.ui.launch` and
  :func:`~.ui.serve` (needs the ``[app]`` extra: ``pip install 'seg4diff-fast[app]'``).

The command is :mod:`seg4diff_fast.cli_app`.
"""

from .logic import AppInputError, AppModel

__all__ = ["AppInputError", "AppModel", "build_app", "launch", "serve"]


def __getattr__(name: str):  # the layout imports gradio: load it only when asked for
    if name in ("build_app", "launch", "serve"):
        from . import ui

        return getattr(ui, name)
    raise AttributeError(name)
