"""Test set-up: without a CUDA device, Triton kernels run on CPU tensors in Triton's interpreter.

TRITON_INTERPRET must be set before triton.jit decorates the kernels, i.e. before any test module
imports seg4diff_fast.kernels; conftest.py is imported first.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.register_assert_rewrite("_capture_check")  # its checks' asserts report like the tests' own


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def poison_outputs(monkeypatch):
    """Make every output buffer the op allocates start as NaN, so an element never written fails."""

    def nan_empty(*shape, dtype=None, device=None, **kw):
        size = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        t = torch.empty(size, dtype=dtype, device=device, **kw)
        return t.fill_(float("nan"))

    import seg4diff_fast.kernels.joint_attention as kernel_mod
    import seg4diff_fast.ops.torch_attention as torch_mod

    monkeypatch.setattr(kernel_mod, "empty_output", nan_empty)
    monkeypatch.setattr(torch_mod, "empty_output", nan_empty)
    return nan_empty


def fresh_seed() -> int:
    """A new random seed for each test run (tests draw fresh inputs; failures print the seed they used)."""
    return int(np.random.SeedSequence().entropy % (2**31))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny-model tests run on one torch thread: on 2 shared cores, threads only contend."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def unpatch_capture(request):
    """After the test, fast capture disabled on its ``pipe`` and ``model`` fixtures (module-scoped: the next
    test starts from the stock processors)."""
    yield
    from seg4diff_fast import disable_fast_capture

    for name in ("pipe", "model"):
        if name in request.fixturenames:
            disable_fast_capture(request.getfixturevalue(name))


@pytest.fixture
def no_embedded_model(monkeypatch, tmp_path):
    """Pretend the package was installed without its ShapesWorld weights (an empty weights folder)."""
    import seg4diff_fast.shapes.shipped as shipped

    empty = tmp_path / "no_weights"
    empty.mkdir()
    monkeypatch.setattr(shipped, "WEIGHTS_DIR", str(empty))
    return str(empty)
