# Every target sets itself up on a fresh machine: it creates .venv if missing, installs torch (CPU wheel
# pinned below) FIRST, then this package in editable mode with its dev extras (building the optional C++
# extension seg4diff_fast._C). The install is a stamp file, redone only when the packaging files change.

PYTHON       ?= python3
VENV         ?= .venv
TORCH_SPEC   ?= torch==2.13.0
PY           := $(VENV)/bin/python
PIP          := $(PY) -m pip
STAMP        := $(VENV)/.seg4diff-fast-installed
OUT          ?= out
BENCH_DEVICE ?= cpu

.PHONY: install test demo bench lint clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch before the package: the package's build imports it (no build isolation, which would fetch a CUDA torch).
$(STAMP): $(PY) setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h)
	$(PIP) install "setuptools>=64" wheel ninja
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install --no-build-isolation -e ".[dev]"
	$(PY) -c "import seg4diff_fast.ops.upsample_argmax as u; print('seg4diff_fast._C built:', u.has_cpp_extension())"
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/seg4diff-fast demo --out $(OUT)/demo

bench: $(STAMP)
	$(PY) benchmarks/bench_attention.py --device $(BENCH_DEVICE)
	$(PY) benchmarks/bench_upsample_argmax.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf build *.egg-info seg4diff_fast/_C*.so $(OUT)
