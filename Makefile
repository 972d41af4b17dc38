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
# `make bench` writes its JSON under $(BENCH_OUT) (git-ignored) and touches no tracked file;
# `make bench SAVE=1` writes benchmarks/results/*.json and the table in benchmarks/README.md (tracked).
BENCH_OUT    ?= $(OUT)/bench
SAVE         ?=

.PHONY: install test demo bench lint clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch before the package: the package's build imports it for seg4diff_fast._C. Without --no-build-isolation pip
# builds in a fresh environment without torch and quietly (shown only with pip -v) leaves _C out.
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
ifeq ($(SAVE),1)
	$(PY) benchmarks/bench_attention.py --device $(BENCH_DEVICE)
	$(PY) benchmarks/bench_upsample_argmax.py
else
	$(PY) benchmarks/bench_attention.py --device $(BENCH_DEVICE) --out $(BENCH_OUT)/attention_$(BENCH_DEVICE).json --no-readme
	$(PY) benchmarks/bench_upsample_argmax.py --out $(BENCH_OUT)/upsample_argmax_cpu.json
	@echo "results in $(BENCH_OUT)/ (make bench SAVE=1 writes benchmarks/results/ and benchmarks/README.md)"
endif

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf build *.egg-info seg4diff_fast/_C*.so $(OUT)
