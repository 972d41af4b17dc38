"""Deprecated name of :mod:`seg4diff_fast.evaluation` (a package named ``eval`` shadows the builtin in reading).

``import seg4diff_fast.eval``, ``from seg4diff_fast.eval.metrics import MeanIoU`` etc. keep working: the
submodules are the very modules of :mod:`seg4diff_fast.evaluation`. Import from there instead.
"""

import sys
import warnings

from .. import evaluation
from ..evaluation import *  # noqa: F403
from ..evaluation import (
    __all__,  # noqa: F401
    datasets,
    layers,
    metrics,
    runner,
)

for _module in (datasets, layers, metrics, runner):
    sys.modules[f"{__name__}.{_module.__name__.rsplit('.', 1)[1]}"] = _module

warnings.warn("seg4diff_fast.eval is deprecated; import seg4diff_fast.evaluation", DeprecationWarning, stacklevel=2)


def __getattr__(name: str):  # names the package resolves lazily (deprecated ones)
    return getattr(evaluation, name)
