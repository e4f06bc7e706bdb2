#!/usr/bin/env bash
# One call: the wide float32 forward's two 16-byte pieces `lanes` pieces apart (each load
# of a group covers whole sectors) instead of consecutive (half of each sector per load).
# base = main (HEAD); new = the working tree; wall = new with the wide forward wherever it
# fills the rounds no worse (detr_enc, detr_dec too). MSDA GPU tests on new and wall while
# the peer warms up, then A/B of GPU time (2 rounds), ncu of m2f_enc fp32's forward (base,
# new), the MSDA benchmark of new with the peers, memcheck on new, the other GPU tests.
set -u
exec > >(tee -a $OUT/run.log) 2>&1
export PYTHONUNBUFFERED=1
PEERDIR=/tmp/deformops-peer
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', torchvision.__version__)"
python -m pip install -q --no-deps --no-index --target $PEERDIR .peer/deformops-3.0.1-py3-none-any.whl
timeout 300 nice -n 10 python -I deformops/bench/peers_worker.py --peer-path $PEERDIR --warm > /tmp/peer_build.log 2>&1 &
PEER=$!
vpath() { case $1 in base) echo $PWD/.peer/base2;; new) echo $PWD;; *) echo $PWD/.peer/v/$1;; esac; }
VARIANTS="base new wall"
BUILDS=""
t0=$SECONDS
for v in $VARIANTS; do
  (P=$(vpath $v); cd /tmp && DEFORMOPS_CACHE_DIR=/tmp/c_$v PYTHONPATH=$P python -m deformops build --device cuda > /tmp/build_$v.log 2>&1) &
  BUILDS="$BUILDS $!"
done
wait $BUILDS; echo "builds: $((SECONDS - t0)) s"
for v in $VARIANTS; do tail -1 /tmp/build_$v.log; done
export PYTHONPATH=$PWD DEFORMOPS_CACHE_DIR=/tmp/c_new
python -m deformops build --device cpu | tail -1
echo "=== msda tests on new ($SECONDS s)"
timeout 150 python -m pytest -q -p no:cacheprovider tests/gpu/test_cuda_ops.py -k msda > $OUT/tests.log 2>&1; echo "rc $?"; tail -1 $OUT/tests.log
echo "=== msda tests on wall ($SECONDS s)"
(cd .peer/v/wall && DEFORMOPS_CACHE_DIR=/tmp/c_wall PYTHONPATH=$PWD timeout 100 python -m pytest -q -p no:cacheprovider tests/gpu/test_cuda_ops.py -k msda > $OUT/tests_wall.log 2>&1; echo "rc $?"; tail -1 $OUT/tests_wall.log)
echo "=== waiting for the peer warm-up ($SECONDS s)"; wait $PEER; echo "peer rc $?"; tail -2 /tmp/peer_build.log
echo "=== A/B ($SECONDS s)"
CASES="m2f_enc:fp32 m2f_enc:fp16 m2f_enc:bf16 detr_enc:fp32 detr_enc:fp16 detr_enc:bf16 detr_dec:fp32 detr_dec:fp16 detr_dec:bf16"
for round in 1 2; do
  for v in $VARIANTS; do
    echo "=== $v round $round" >> $OUT/ab_profile.txt
    DEFORMOPS_CACHE_DIR=/tmp/c_$v PYTHONPATH=$(vpath $v) timeout 60 python scripts/profile_kernels.py $CASES --runs 20 >> $OUT/ab_profile.txt 2>&1
  done
done
grep -E "^=== |GPU time" $OUT/ab_profile.txt
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu | head -n1)
for v in base new; do
  DEFORMOPS_CACHE_DIR=/tmp/c_$v PYTHONPATH=$(vpath $v) timeout 60 $NCU -k regex:msda_forward --launch-skip 3 --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis --section InstructionStats --section Occupancy python scripts/profile_kernels.py m2f_enc:fp32 --runs 1 > $OUT/ncu_$v.txt 2>&1
  echo "== ncu $v"; grep -E "Duration|L1/TEX Cache Throughput|L2 Cache Throughput|L1/TEX Hit|Executed Instructions  " $OUT/ncu_$v.txt | cut -c1-100
done
echo "=== bench new with peers ($SECONDS s)"
DEFORMOPS_BACKEND=native timeout 150 python -m deformops.bench.cli --out $OUT --peer-path $PEERDIR --peer-timeout 120 --op msda --name msda --impl deformops pytorch-grid-sample peer-deformops-3.0.1-cuda peer-deformops-3.0.1-triton
echo "=== memcheck ($SECONDS s)"
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer | head -n1)
PYTORCH_NO_CUDA_MEMORY_CACHING=1 DEFORMOPS_BACKEND=native timeout 90 $SAN --tool memcheck --error-exitcode 1 --print-limit 50 --target-processes all python tests/gpu/sanitize_cases.py > $OUT/sanitizer.log 2>&1; echo "memcheck rc $?"; tail -2 $OUT/sanitizer.log
echo "=== other GPU tests ($SECONDS s)"
timeout $((560 - SECONDS > 20 ? 560 - SECONDS : 20)) python -m pytest -q -p no:cacheprovider tests/gpu -k "not msda or not test_cuda_ops" >> $OUT/tests.log 2>&1; echo "rc $?"; tail -1 $OUT/tests.log
echo "=== done ($SECONDS s)"
