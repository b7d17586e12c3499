#!/usr/bin/env bash
# The gpu scale as one prepared command: set up, show the GPU and FAISS, run `knnlm reproduce --scale gpu` under a time
# limit, write the report (also after a timeout: the stages finished so far), and copy it to $OUT when $OUT is set.
#   bash scripts/gpu_check.sh                          # scripts/setup.sh (network), then the recipe
#   KNNLM_PYTHON=python3 bash scripts/gpu_check.sh     # no set-up: a Python that already has knnlm's dependencies
# Environment (all optional):
#   DATA_DIR   WikiText-2 folder (train.txt, valid.txt); default ../shared/data/wikitext-2, else shared/data/wikitext-2
#   RUN_DIR    the reproduce output folder (default runs/reproduce-gpu); a rerun resumes it
#   TIMEOUT_S  wall-clock limit of the reproduce command (default 1200: twice the 10-minute budget); 124 = timed out,
#              rerun the same command to continue
#   STAGES     a comma list: run only these stages of the recipe (--stages), e.g. where some assets are missing
#   SMOKE=1    add --smoke (every stage in seconds on CPU: checks this script on a machine without a GPU)
#   OUT        a folder that receives report.md, results.json, timings.json, gpu_check.log and stage-results.tar.gz
#              (every stage's results.json / results.md / config.json and the figures)
# Measured stage times land in the report's Stages table beside the recipe's budget: copy them into docs/reproduce.md.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
RUN_DIR=${RUN_DIR:-runs/reproduce-gpu$([ "${SMOKE:-0}" = 1 ] && echo -smoke)}
TIMEOUT_S=${TIMEOUT_S:-1200}
if [ -z "${DATA_DIR:-}" ]; then
  for d in ../shared/data/wikitext-2 shared/data/wikitext-2; do
    if [ -f "$d/train.txt" ]; then DATA_DIR=$d; break; fi
  done
fi
mkdir -p "$RUN_DIR"
LOG="$RUN_DIR/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1

echo "== gpu_check $(date -u +%FT%TZ) on $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: no GPU visible"
if [ -n "${KNNLM_PYTHON:-}" ]; then
  PY=$KNNLM_PYTHON
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
  t0=$(date +%s)
  bash scripts/setup.sh || { echo "gpu_check: scripts/setup.sh failed"; exit 1; }
  echo "setup: $(( $(date +%s) - t0 )) s"
  PY=.venv/bin/python
fi
"$PY" - <<'EOF' || { echo "gpu_check: knnlm's dependencies are missing (run scripts/setup.sh, or carry them)"; exit 1; }
import faiss, torch, knnlm
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), GPU {gpu}; faiss {faiss.__version__}, "
      f"GPUs seen by faiss: {faiss.get_num_gpus() if hasattr(faiss, 'StandardGpuResources') else 0}")
EOF
[ -n "${DATA_DIR:-}" ] || { echo "gpu_check: no WikiText-2 folder found; set DATA_DIR"; exit 1; }

ARGS=(--scale gpu --data_dir "$DATA_DIR" --output_dir "$RUN_DIR")
[ "${SMOKE:-0}" = 1 ] && ARGS+=(--smoke)
RUN_ARGS=("${ARGS[@]}")
[ -n "${STAGES:-}" ] && RUN_ARGS+=(--stages "$STAGES")
t0=$(date +%s)
timeout "$TIMEOUT_S" "$PY" -m knnlm reproduce "${RUN_ARGS[@]}"
rc=$?
echo "reproduce --scale gpu: exit $rc after $(( $(date +%s) - t0 )) s (limit $TIMEOUT_S s)"
if [ "$rc" != 0 ]; then  # timed out or a stage failed: report what finished
  "$PY" -m knnlm reproduce "${ARGS[@]}" --report_only
fi
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
  cp "$RUN_DIR/report.md" "$RUN_DIR/results.json" "$RUN_DIR/stages/timings.json" "$OUT"/ 2>/dev/null
  (cd "$RUN_DIR" && find . -maxdepth 2 \( -name results.json -o -name results.md -o -name config.json \
      -o -name '*.png' \) -print0 | tar czf "$OUT/stage-results.tar.gz" --null -T -)
  cp "$LOG" "$OUT/gpu_check.log"
  echo "copied the report to $OUT"
fi
exit "$rc"
