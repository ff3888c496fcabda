#!/usr/bin/env bash
# One call (under 9 minutes) on a GPU machine: the CUDA tests, the published MaSSL step and
# massl's step side by side on the same card, the loss path alone, and one table of every row's
# images/s and peak memory as a ratio to the published step's (benchmarks/gpu_table.py). Results
# under $OUT.
#
# The published step is timed by a benchmark of the published MaSSL code that is not part of
# massl: PUBLISHED_DIR (default .ref, git-ignored) holds `bench_published_step.py`, which imports
# the published code beside it and writes the JSON rows benchmarks/gpu_table.py reads. Without it
# the table has no published rows and the ratios are left out. On a machine without a package
# index, put the wheels of webdataset and deepspeed in .whl/ (installed first):
#   PUBLISHED_DIR=/path/to/published OUT=/tmp/gpu bash benchmarks/gpu_check.sh
# What comes back under $OUT: gpu_check.log (everything printed), published.json (the published
# step), massl.json (massl's rows, the loss path, the merged table rows), table.md (the table,
# also the last lines printed).
#
# Budget, each part under its own timeout (seconds): setup 15, tests 75, published step 195,
# ViT-S/16 x128 50, ViT-B/16 x64 60, ViT-B/16 x64 fsdp / ZeRO-2 / ZeRO-3 120, loss path 25,
# table 5: 545.
#
# A second call, `bash benchmarks/gpu_check.sh extra` (about 6 minutes; carry .whl and
# .bench_jpegs, written here by `python benchmarks/bench_data.py --write-images .bench_jpegs`, as
# the GPU image has no scikit-image), times ViT-B/16 with compiled blocks, the data path on the
# device (gpu_augment and device decode, loader + device images/s) and the memory benchmark. simplejpeg can travel as a
# wheel (`pip download simplejpeg==1.9.0 --no-deps --only-binary=:all: --python-version 3.12
# --platform manylinux2014_x86_64 -d .whl`); OpenCV's 61 MB wheel does not fit the carry, so the
# data benchmark skips its (b) row there.
set -uo pipefail
OUT=${OUT:-/tmp/massl_gpu_out}
WORK=/tmp/massl_gpu_check  # per-part JSON, merged into $OUT/massl.json (at most 8 files come back)
mkdir -p "$OUT" "$WORK"
LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1

part() {  # part SECONDS NAME COMMAND...: run under a timeout, log it, go on whatever happens
  local limit=$1 name=$2
  shift 2
  echo "=== $name (limit ${limit} s, $(date +%T))" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "=== $name: exit status ${PIPESTATUS[0]}" | tee -a "$LOG"
}

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
  git log -1 --format='commit %h %cd' 2>/dev/null; date; } 2>&1 | tee -a "$LOG"

if [ "${1:-step}" = extra ]; then
  part 115 "massl step, ViT-B/16, batch 64, compiled blocks" python3 benchmarks/bench_step.py --steps 8 --warmup 3 \
    --archs vit_base --batch 64 --engines single --ac none --compile on --out "$OUT/step_vitb_compiled.json"
  part 150 "data path on the device" python3 benchmarks/bench_data.py --images .bench_jpegs --device cuda --reps 3 \
    --per-rep 21 --e2e-batches 40 --out "$OUT/data_gpu.json"
  part 90 "memory benchmark" python3 benchmarks/bench_memory.py --device cuda --out "$OUT/bench_memory_cuda.json"
  exit 0
fi
part 75 "CUDA tests" python3 -m pytest -q tests/test_gpu.py
PUBLISHED_DIR=${PUBLISHED_DIR:-.ref}
if [ -f "$PUBLISHED_DIR/bench_published_step.py" ]; then
  part 195 "published step" python3 "$PUBLISHED_DIR/bench_published_step.py" "$OUT/published.json"
else
  echo "=== published step: $PUBLISHED_DIR/bench_published_step.py missing (see this script's header)" | tee -a "$LOG"
fi
STEP=(python3 benchmarks/bench_step.py --steps 8 --warmup 3)
part 50 "massl step, ViT-S/16, batch 128" "${STEP[@]}" --archs vit_small --batch 128 --engines single fsdp \
  --ac none full --out "$WORK/step_vits.json"
part 60 "massl step, ViT-B/16, batch 64" "${STEP[@]}" --archs vit_base --batch 64 --engines single fsdp \
  --ac none full --out "$WORK/step_vitb.json"
# DeepSpeed ZeRO-2 and ZeRO-3 beside fsdp, ViT-B/16 bf16 (a process of their own: DeepSpeed keeps global state)
part 120 "massl step, ViT-B/16, batch 64, fsdp / DeepSpeed ZeRO-2 / ZeRO-3" "${STEP[@]}" --archs vit_base --batch 64 \
  --engines fsdp deepspeed --zero-stage 2 3 --ac none --out "$WORK/step_vitb_deepspeed.json"
part 25 "loss path alone, 64 images" python3 benchmarks/bench_memory.py --device cuda --batch 64 --chunk-rows 0 \
  --iters 5 --warmup 2 --out "$WORK/loss_b64.json"

echo "=== table ($(date +%T))" | tee -a "$LOG"
python3 benchmarks/gpu_table.py "$OUT/published.json" "$WORK"/step_*.json --loss "$WORK"/loss_*.json \
  --out "$OUT/massl.json" --md "$OUT/table.md" 2>&1 | tee -a "$LOG"
