#!/usr/bin/env bash
# One entry point for a fresh CPU machine: installs the pinned environment into .venv once,
# then runs `demo` (the main job on a generated model) or `test` (the test suite).
#   bash scripts/dev.sh demo [sglang-mp demo flags]
#   bash scripts/dev.sh test [pytest flags]
# SGLANG_VERSION picks the SGLang release (default 0.5.17, in .venv); another release gets its own venv,
# .venv-sglang-<version>, installed from requirements/cpu-sglang-<version>.txt:
#   SGLANG_VERSION=0.5.23 bash scripts/dev.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
SGLANG_VERSION=${SGLANG_VERSION:-0.5.17}
SGLANG_REQUIREMENTS=requirements/cpu-sglang-$SGLANG_VERSION.txt
[ -f "$SGLANG_REQUIREMENTS" ] || { echo "no $SGLANG_REQUIREMENTS: SGLang $SGLANG_VERSION has no CPU environment here" >&2; exit 2; }
if [ "$SGLANG_VERSION" = 0.5.17 ]; then DEFAULT_VENV=.venv; else DEFAULT_VENV=.venv-sglang-$SGLANG_VERSION; fi
VENV=${VENV:-$DEFAULT_VENV}
STAMP="$VENV/.installed-$(cat requirements/cpu.txt "$SGLANG_REQUIREMENTS" pyproject.toml | sha1sum | cut -c1-12)"

install() {
  echo "== installing the CPU environment (SGLang $SGLANG_VERSION) into $VENV (first run only; several minutes)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  # torch + torchvision first: SGLang imports torchvision at start-up; these two releases are
  # the CPU machines' own and pull only their declared dependencies.
  "$VENV/bin/pip" install -q "torch==2.14.1" "torchvision==0.29.1"
  "$VENV/bin/pip" install -q --no-deps -r requirements/cpu.txt
  "$VENV/bin/pip" install -q --no-deps -r "$SGLANG_REQUIREMENTS"
  "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e .
  "$VENV/bin/python" -c "import sglang.srt.layers.quantization, sglang_mixed_precision.cli" \
    || { echo "environment check failed: SGLang or the project does not import" >&2; exit 1; }
  touch "$STAMP"
}

[ -f "$STAMP" ] || install
cmd=${1:-test}; shift || true
case "$cmd" in
  demo) exec "$VENV/bin/sglang-mp" demo "$@" ;;
  test)
    # Lint and format first (line length 120, pyproject.toml [tool.ruff]): a failing check stops the run.
    "$VENV/bin/ruff" check python test bench ./*.py
    "$VENV/bin/ruff" format --check python test bench ./*.py
    exec "$VENV/bin/python" -m pytest test "$@" ;;
  *) echo "usage: bash scripts/dev.sh demo|test [args]" >&2; exit 2 ;;
esac
