#!/usr/bin/env bash
# Create .venv with everything the pipeline, the runtime and the tests need (CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned or ranged torch pulls a multi-GB CUDA build.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[openvino,export,pipeline,serve,dev]"
# The upstream package is only a test oracle: no deps (they would pull lmdeploy, gradio, ...).
.venv/bin/python -m pip install -q --no-deps soprano-tts
.venv/bin/python -c "import torch, onnxruntime, openvino, soprano; print('setup ok: torch', torch.__version__, '| onnxruntime', onnxruntime.__version__, '| openvino', openvino.__version__)"
# Debian's chromium for tests/test_page.py (Playwright's own browser download does not work here).
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; else
    echo "setup: /usr/bin/chromium is missing and we are neither root nor have sudo: install Debian's 'chromium' package" >&2; exit 1
  fi
  { $SUDO apt-get update -q && $SUDO apt-get install -y -q --no-install-recommends chromium; } || {
    echo "setup: 'apt-get install chromium' failed (needed by tests/test_page.py): install Debian's 'chromium' package by hand" >&2; exit 1; }
fi
