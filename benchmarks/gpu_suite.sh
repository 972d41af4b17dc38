#!/usr/bin/env bash
# The GPU suite in one command, from the repository root on a fresh CUDA machine (< 10 min on one H100/H200):
#
#   bash benchmarks/gpu_suite.sh                # install, then benchmarks/gpu_suite.py: JSON in benchmarks/results/
#   bash benchmarks/gpu_suite.sh --offline      # no package registry: this package --no-deps, wheels from
#                                               # $GPU_SUITE_WHEELS; the torch / triton already there
#   bash benchmarks/gpu_suite.sh --no-install   # nothing installed (the package must already import)
#   bash benchmarks/gpu_suite.sh --dry-run      # CPU rehearsal: small shapes, TRITON_INTERPRET=1, < 3 min, no install
#
# Every other flag goes to benchmarks/gpu_suite.py (--out PATH, --budget-s S, --skip SECTION ..., --shapes sd3,flux).
# Install steps (each under a timeout; a failed step is recorded in the JSON's "install" section and the suite
# goes on with what is there, e.g. on a machine with no package registry):
#   1. torch==2.13.0 unless a CUDA torch 2.13 is already importable (pip picks the CUDA build for the machine)
#   2. pip install --no-build-isolation -e .[dev]  (falls back to --no-deps -e .); the optional C++ extension is
#      skipped (SEG4DIFF_NO_EXT=1: the suite does not use it; GPU_SUITE_BUILD_EXT=1 builds it)
#   3. wheels in $GPU_SUITE_WHEELS (a folder, e.g. diffusers carried to an offline machine), --no-index
#   4. flash-attn from a binary wheel if one installs within 120 s (the attention section times it when present)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
PY=${PYTHON:-python3}
install=1
offline=0
args=()
for a in "$@"; do
  case "$a" in
    --no-install) install=0 ;;
    --offline) offline=1 ;;
    --dry-run) install=0; args+=("$a") ;;
    *) args+=("$a") ;;
  esac
done
LOG=${GPU_SUITE_INSTALL_LOG:-$(mktemp /tmp/gpu_suite_install.XXXXXX)}
export GPU_SUITE_INSTALL_LOG=$LOG

step() {  # step NAME TIMEOUT CMD...: run, time and record one install step as a JSON line
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS status
  echo "[gpu_suite.sh] $name: $*"
  if timeout "$limit" "$@" >"$LOG.$name.out" 2>&1; then status=ok; else status="failed rc=$?"; fi
  "$PY" - "$name" "$status" "$((SECONDS - t0))" "$LOG.$name.out" "$@" >>"$LOG" <<'PYEOF'
import json, sys
name, status, seconds, out, *cmd = sys.argv[1:]
print(json.dumps({"step": name, "status": status, "seconds": int(seconds), "cmd": " ".join(cmd),
                  "tail": open(out, errors="replace").read()[-600:]}))
PYEOF
  [ "$status" = ok ]
}

PIP=("$PY" -m pip install -q --timeout 15 --retries 1)  # fail fast where no registry answers
if [ "$install" = 1 ] && [ "$offline" = 1 ]; then
  : >"$LOG"
  [ "${GPU_SUITE_BUILD_EXT:-0}" = 1 ] || export SEG4DIFF_NO_EXT=1
  step package_no_deps 120 "${PIP[@]}" --no-build-isolation --no-deps --no-index -e .
  if [ -n "${GPU_SUITE_WHEELS:-}" ] && [ -d "$GPU_SUITE_WHEELS" ]; then
    step wheels 120 "${PIP[@]}" --no-index --no-deps "$GPU_SUITE_WHEELS"/*.whl
  fi
elif [ "$install" = 1 ]; then
  : >"$LOG"
  if "$PY" -c 'import sys, torch; sys.exit(0 if torch.__version__.startswith("2.13") and torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "{\"step\": \"torch\", \"status\": \"present\", \"seconds\": 0}" >>"$LOG"
  else
    step torch 600 "${PIP[@]}" torch==2.13.0 || echo "[gpu_suite.sh] torch 2.13 not installed: going on with $("$PY" -c 'import torch; print(torch.__version__)' 2>&1)"
  fi
  [ "${GPU_SUITE_BUILD_EXT:-0}" = 1 ] || export SEG4DIFF_NO_EXT=1
  step package 300 "${PIP[@]}" --no-build-isolation -e ".[dev]" \
    || step package_no_deps 120 "${PIP[@]}" --no-build-isolation --no-deps --no-index -e .
  if [ -n "${GPU_SUITE_WHEELS:-}" ] && [ -d "$GPU_SUITE_WHEELS" ]; then
    step wheels 120 "${PIP[@]}" --no-index --no-deps "$GPU_SUITE_WHEELS"/*.whl
  fi
  "$PY" -c 'import flash_attn' 2>/dev/null \
    || step flash_attn 120 "${PIP[@]}" --only-binary=:all: flash-attn \
    || echo "[gpu_suite.sh] no flash-attn wheel: the suite times SDPA's backends only"
fi
exec "$PY" benchmarks/gpu_suite.py "${args[@]}" --install-log "$LOG"
