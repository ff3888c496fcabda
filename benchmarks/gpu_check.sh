#!/usr/bin/env bash
# One call on a GPU machine (the device tool): CUDA tests, then the benchmarks, results under $OUT.
# Prepare here first: bash ../shared/gpu/fetch_wheels.sh (fills .whl/ with deepspeed, webdataset & co), then
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=580)
# Budget: about 9 minutes; each part has its own timeout so a hang cannot eat the call.
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
timeout 120 python3 -m pytest -q tests/test_gpu.py tests/test_loss.py 2>&1 | tee "$OUT/tests.log"
timeout 240 python3 benchmarks/bench_step.py --steps 8 --warmup 3 --out "$OUT/bench_step.json" 2>&1 | tee "$OUT/bench_step.log"
# DeepSpeed ZeRO-2 and ZeRO-3 beside fsdp (the reference row), ViT-B/16 bf16, in one process one after the other
timeout 180 python3 benchmarks/bench_step.py --archs vit_base --engines fsdp deepspeed --zero-stage 2 3 --ac none \
  --precision bf16 --steps 8 --warmup 3 --out "$OUT/bench_step_deepspeed.json" 2>&1 | tee "$OUT/bench_step_deepspeed.log"
timeout 90 python3 benchmarks/bench_memory.py --device cuda --out "$OUT/bench_memory_cuda.json" 2>&1 | tee "$OUT/bench_memory.log"
echo "done: $(ls "$OUT")"
