#!/usr/bin/env bash
# One run on a GPU machine for the kernels: environment, build, bench/kernels.py, the CUDA tests and
# an Nsight Compute profile, each logged under $OUT (default ./out). From the repository root:
#     bash bench/h200_kernels.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" NVQ_CACHE_DIR="${NVQ_CACHE_DIR:-/tmp/nvq-cache}"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem --format=csv
  python3 -c "import torch, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', platform.python_version())"
  nvcc --version | tail -2
  python3 -c "from nvq import ops; print('library', ops.build_library())"
} 2>&1 | tee "$OUT/env.log"
timeout "${BENCH_TIMEOUT:-300}" python3 bench/kernels.py ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
echo "bench exit ${PIPESTATUS[0]}"
if [ -n "${BENCH2_ARGS:-}" ]; then  # a second bench, e.g. "--batch 8 --no-reference", its JSON in $OUT/batch
  mkdir -p "$OUT/batch"
  OUT="$OUT/batch" timeout "${BENCH_TIMEOUT:-300}" python3 bench/kernels.py $BENCH2_ARGS 2>&1 | tee "$OUT/bench-batch.log" | tail -30
  echo "bench 2 exit ${PIPESTATUS[0]}"
fi
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -m cuda tests/test_kernels_cuda.py -q -p no:cacheprovider -rf 2>&1 \
  | tee "$OUT/tests.log" | tail -25
if [ -z "${SKIP_NCU:-}" ] && command -v ncu >/dev/null; then
  timeout "${NCU_TIMEOUT:-150}" ncu --clock-control none --kernel-name regex:'amax|quantize|table' --launch-skip 0 \
    --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed,smsp__issue_active.avg.pct_of_peak_sustained_active,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum,launch__registers_per_thread \
    python3 bench/profile_kernels.py > "$OUT/ncu.log" 2>&1
  echo "ncu exit $?"
  grep -E "^\s+void|^\s+nvq|gpu__time|dram__|issue_active|inst_executed" "$OUT/ncu.log" | sed 's/  */ /g' | cut -c1-150
fi
