"""Build script: the pure-Python package plus an optional C++ extension, ``seg4diff_fast._C``.

The extension (``csrc/*.cpp``) is built with ``torch.utils.cpp_extension`` when torch and a C++
compiler are available at build time. It is optional: if torch is missing from the build environment,
there is no compiler, or compilation fails, a warning is printed and the install goes on without it;
``seg4diff_fast`` then uses its pure-torch fallbacks. pip shows a build's output, and so this warning,
only with ``pip -v``; ``seg4diff-fast --version`` tells whether ``_C`` was built.

torch must be installed *before* this package, and the build must see it, so install with
``pip install --no-build-isolation .``. With build isolation (a plain ``pip install .`` / ``pip wheel .``)
pip builds in a fresh environment holding only ``[build-system] requires`` (setuptools, wheel; no torch,
and none is downloaded): the extension is left out and a pure-Python ``py3-none-any`` wheel is built.

Metadata, dependencies and tool settings live in ``pyproject.toml``; this file only describes what is
built and where the top-level ``kernels/`` folder goes (``seg4diff_fast.kernels``).
"""

from __future__ import annotations

import glob
import os
import sys
import warnings

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "seg4diff_fast._C"
SKIP_ENV = "SEG4DIFF_NO_EXT"  # set to 1 to skip the C++ extension on purpose


def _warn(msg: str) -> None:
    warnings.warn(msg, stacklevel=1)
    print(f"WARNING (seg4diff-fast): {msg}", file=sys.stderr)


def _extensions_and_cmdclass():
    """The C++ extension and its build command, or ([], {}) when it cannot be built here."""
    if os.environ.get(SKIP_ENV, "0") not in ("", "0"):
        _warn(f"{SKIP_ENV} is set: not building {EXT_NAME}; the pure-torch fallbacks will be used")
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:  # torch absent from the build environment
        _warn(
            f"torch is not importable at build time ({exc}); {EXT_NAME} is not built and the pure-torch "
            "fallbacks will be used. Install torch first and use `pip install --no-build-isolation .`"
        )
        return [], {}

    cxx = ["-O3", "-std=c++17"]
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for only runs in parallel when compiled with OpenMP; libgomp resolves to the copy
        # torch has already loaded (same soname).
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    ext = CppExtension(
        EXT_NAME,
        sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
        optional=True,
    )

    class OptionalBuildExtension(BuildExtension):
        """Builds the C++ extension if it can; warns and carries on without it if it cannot."""

        def run(self):
            try:
                super().run()
            except Exception as exc:
                _warn(f"building {EXT_NAME} failed ({type(exc).__name__}: {exc}); using the pure-torch fallbacks")
                self.extensions = []

        def build_extensions(self):
            self._failed = []
            super().build_extensions()
            # Drop what failed so that later steps (in-place copy, wheel contents) do not look for it.
            self.extensions = [e for e in self.extensions if e not in self._failed]

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                _warn(f"compiling {ext.name} failed ({type(exc).__name__}: {exc}); using the pure-torch fallbacks")
                self._failed.append(ext)

    # use_ninja follows torch's default (ninja if importable), which keeps rebuilds incremental.
    return [ext], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = _extensions_and_cmdclass()

setup(
    packages=find_packages(include=["seg4diff_fast", "seg4diff_fast.*"]) + ["seg4diff_fast.kernels"],
    package_dir={"seg4diff_fast.kernels": "kernels"},
    include_package_data=True,
    # data/**/* holds the class-name lists and the demo's scenes (data/demo/); shapes/weights/ is the embedded
    # ShapesWorld pipeline, the CLI's default model, shapes/magnet_lora/ its MAGNET LoRA (the demo's MAGNET side;
    # `seg4diff-fast demo` needs them all in a non-editable install).
    package_data={"seg4diff_fast": ["data/**/*", "data/demo/*", "shapes/weights/**/*", "shapes/magnet_lora/*",
                                    "shapes/NOTES.md", "py.typed"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
