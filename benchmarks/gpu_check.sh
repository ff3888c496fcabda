#!/usr/bin/env bash
# One call on a GPU machine (the device tool): CUDA tests, then the benchmarks, results under $OUT.
# Prepare here first: bash ../shared/gpu/fetch_wheels.sh (fills .whl/ with webdataset & co) and
# python benchmarks/bench_data.py --write-images .bench_jpegs (the GPU image has no scikit-image;
# nor simplejpeg: `pip download simplejpeg==1.9.0 --no-deps --only-binary=:all: --python-version 3.12
# --platform manylinux2014_x86_64 -d .whl` adds it; OpenCV's 61 MB wheel does not fit the carry), then
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl", ".bench_jpegs"], timeout_s=600)
# or one part: bash benchmarks/gpu_check.sh data   (parts: tests step memory data; default all)
# Budget: about 9 minutes for all; each part has its own timeout so a hang cannot eat the call.
set -uo pipefail
OUT=${OUT:-/tmp/massl_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch; print('torch', torch.__version__)"; } \
  2>&1 | tee "$OUT/machine.txt"
PARTS=${1:-all}
part() { [ "$PARTS" = all ] || [ "$PARTS" = "$1" ]; }
part tests && timeout 180 python3 -m pytest -q tests/test_gpu.py tests/test_loss.py 2>&1 | tee "$OUT/tests.log"
part step && timeout 240 python3 benchmarks/bench_step.py --steps 8 --warmup 3 --out "$OUT/bench_step.json" 2>&1 | tee "$OUT/bench_step.log"
part memory && timeout 90 python3 benchmarks/bench_memory.py --device cuda --out "$OUT/bench_memory_cuda.json" 2>&1 | tee "$OUT/bench_memory.log"
# CPU rows (no OpenCV there: no (b)), the device cost of gpu_augment and device decode, loader + device images/s
# against the step's (bench_step.json when the step part ran)
STEP=(); [ -f "$OUT/bench_step.json" ] && STEP=(--step-json "$OUT/bench_step.json")
part data && timeout 150 python3 benchmarks/bench_data.py --images .bench_jpegs --device cuda --reps 3 --per-rep 21 \
  --e2e-batches 40 "${STEP[@]}" --machine "$(head -2 "$OUT/machine.txt" | tail -1)" --out "$OUT/data_gpu.json" 2>&1 | tee "$OUT/bench_data.log"
echo "done: $(ls "$OUT")"
