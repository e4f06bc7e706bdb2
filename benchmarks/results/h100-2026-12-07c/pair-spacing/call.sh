#!/usr/bin/env bash
# One call (branch msda-value-strides): does the value rows' 1 KiB spacing cost the caches?
# m2f_enc / detr_enc as they are, with their heads as images (--heads-to-batch: a pair's rows
# contiguous, same samples), and with the kernels reading a pair-major copy of the value
# (DEFORMOPS_MSDA_PAIR_MAJOR=1: the copy's time included). GPU time (2 rounds), ncu L1 hit
# rates of m2f_enc fp32's kernels, then the MSDA GPU tests under the pair-major copy.
set -u
exec > >(tee -a $OUT/run.log) 2>&1
BUDGET=${CALL_BUDGET:-500}
left() { echo $((BUDGET - SECONDS)); }
lim() { local l=$(( $(left) - $2 )); ((l > $1)) && l=$1; ((l < 5)) && l=5; echo $l; }
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD DEFORMOPS_CACHE_DIR=/tmp/c_new
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -m deformops build --device cuda | tail -1
python -m deformops build --device cpu | tail -1
CASES="m2f_enc:fp32 m2f_enc:fp16 m2f_enc:bf16 detr_enc:fp32 detr_enc:fp16"
for round in 1 2; do
  echo "=== plain round $round" >> $OUT/ab_profile.txt
  timeout 60 python scripts/profile_kernels.py $CASES --runs 20 >> $OUT/ab_profile.txt 2>&1
  echo "=== heads-to-batch round $round" >> $OUT/ab_profile.txt
  timeout 60 python scripts/profile_kernels.py $CASES --runs 20 --heads-to-batch >> $OUT/ab_profile.txt 2>&1
  echo "=== pair-major round $round" >> $OUT/ab_profile.txt
  DEFORMOPS_MSDA_PAIR_MAJOR=1 timeout 60 python scripts/profile_kernels.py $CASES --runs 20 >> $OUT/ab_profile.txt 2>&1
done
grep -E "^=== |GPU time" $OUT/ab_profile.txt
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu | head -n1)
SECTIONS="--section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section InstructionStats --section LaunchStats"
for v in plain heads pair; do
  EXTRA=""; ENV=""
  [ $v = heads ] && EXTRA="--heads-to-batch"
  [ $v = pair ] && ENV="DEFORMOPS_MSDA_PAIR_MAJOR=1"
  env $ENV timeout $(lim 60 150) $NCU -k regex:msda_ --launch-skip 6 --launch-count 2 $SECTIONS python scripts/profile_kernels.py m2f_enc:fp32 --runs 1 $EXTRA > $OUT/ncu_$v.txt 2>&1
  echo "== $v"; grep -E "msda_|Duration|L2 Cache Throughput|L1/TEX Hit|L2 Hit|Shared Memory Configuration|Registers Per" $OUT/ncu_$v.txt | cut -c1-120
done
echo "=== MSDA GPU tests with the pair-major copy ($SECONDS s)"
DEFORMOPS_MSDA_PAIR_MAJOR=1 timeout $(lim 150 5) python -m pytest -q -p no:cacheprovider tests/gpu/test_cuda_ops.py -k msda > $OUT/tests_pair.log 2>&1; echo "rc $?"; tail -1 $OUT/tests_pair.log
echo "=== done ($SECONDS s)"
