#!/usr/bin/env bash
# One call: 32-byte lanes. base = main (HEAD); new = the working tree (the forward's
# float32 lanes 32 bytes wide); wideb = new plus 32-byte lanes in the backward where the
# value or its gradient workspace is float32 (spills 84 bytes in float32). A/B of GPU time
# (2 rounds), MSDA GPU tests on new, ncu of m2f_enc fp32's forward (base, new), the MSDA
# benchmark with the peers for new and base, memcheck of the sanitizer cases on new, then
# the other GPU tests.
set -u
exec > >(tee -a $OUT/run.log) 2>&1
BUDGET=${CALL_BUDGET:-575}
left() { echo $((BUDGET - SECONDS)); }
lim() { local l=$(( $(left) - $2 )); ((l > $1)) && l=$1; ((l < 5)) && l=5; echo $l; }
export PYTHONUNBUFFERED=1
PEERDIR=/tmp/deformops-peer
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', torchvision.__version__)"
python -m pip install -q --no-deps --no-index --target $PEERDIR .peer/deformops-3.0.1-py3-none-any.whl
timeout 400 nice -n 10 python -I deformops/bench/peers_worker.py --peer-path $PEERDIR --warm > /tmp/peer_build.log 2>&1 &
PEER=$!
vpath() { case $1 in base) echo $PWD/.peer/base2;; new) echo $PWD;; *) echo $PWD/.peer/v/$1;; esac; }
VARIANTS="base new wideb"
BUILDS=""
t0=$SECONDS
for v in $VARIANTS; do
  (P=$(vpath $v); cd /tmp && DEFORMOPS_CACHE_DIR=/tmp/c_$v PYTHONPATH=$P python -m deformops build --device cuda > /tmp/build_$v.log 2>&1) &
  BUILDS="$BUILDS $!"
done
wait $BUILDS; echo "builds: $((SECONDS - t0)) s"
for v in $VARIANTS; do tail -1 /tmp/build_$v.log; done
export PYTHONPATH=$PWD DEFORMOPS_CACHE_DIR=/tmp/c_new
python -m deformops build --device cpu
echo "=== msda tests ($SECONDS s)"
timeout $(lim 150 330) python -m pytest -q -p no:cacheprovider tests/gpu/test_cuda_ops.py -k msda > $OUT/tests.log 2>&1; echo "rc $?"; tail -2 $OUT/tests.log
CASES="m2f_enc:fp32 m2f_enc:fp16 m2f_enc:bf16 detr_enc:fp32 detr_enc:fp16 detr_enc:bf16 detr_dec:fp32 detr_dec:fp16 detr_dec:bf16"
echo "=== A/B ($SECONDS s)"
for round in 1 2; do
  for v in $VARIANTS; do
    echo "=== $v round $round" >> $OUT/ab_profile.txt
    DEFORMOPS_CACHE_DIR=/tmp/c_$v PYTHONPATH=$(vpath $v) timeout 60 python scripts/profile_kernels.py $CASES --runs 20 >> $OUT/ab_profile.txt 2>&1
  done
done
grep -E "^=== |GPU time" $OUT/ab_profile.txt
echo "=== ncu ($SECONDS s)"
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu | head -n1)
for v in base new; do
  DEFORMOPS_CACHE_DIR=/tmp/c_$v PYTHONPATH=$(vpath $v) timeout $(lim 60 200) $NCU -k regex:msda_forward --launch-skip 3 --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats --section InstructionStats python scripts/profile_kernels.py m2f_enc:fp32 --runs 1 > $OUT/ncu_$v.txt 2>&1
  grep -E "Duration|L2 Cache Throughput|L1/TEX Hit|L2 Hit|Executed Instructions  |Achieved Occ|Registers Per" $OUT/ncu_$v.txt
done
echo "=== waiting for the peer warm-up ($SECONDS s)"; wait $PEER; echo "peer rc $?"; tail -2 /tmp/peer_build.log
echo "=== bench new with peers ($SECONDS s)"
DEFORMOPS_BACKEND=native timeout $(lim 150 120) python -m deformops.bench.cli --out $OUT --peer-path $PEERDIR --peer-timeout 120 --op msda --name msda --impl deformops pytorch-grid-sample peer-deformops-3.0.1-cuda peer-deformops-3.0.1-triton
echo "=== bench base ($SECONDS s)"
mkdir -p $OUT/base
P=$(vpath base); (cd /tmp && DEFORMOPS_CACHE_DIR=/tmp/c_base PYTHONPATH=$P DEFORMOPS_BACKEND=native timeout $(lim 60 60) python -m deformops.bench.cli --out $OUT/base --op msda --name msda --impl deformops)
echo "=== memcheck ($SECONDS s)"
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer | head -n1)
PYTORCH_NO_CUDA_MEMORY_CACHING=1 DEFORMOPS_BACKEND=native timeout $(lim 120 90) $SAN --tool memcheck --error-exitcode 1 --print-limit 50 --target-processes all python tests/gpu/sanitize_cases.py > $OUT/sanitizer.log 2>&1; echo "memcheck rc $?"; tail -3 $OUT/sanitizer.log
echo "=== other GPU tests ($SECONDS s)"
timeout $(lim 300 5) python -m pytest -q -p no:cacheprovider tests/gpu -k "not msda or not test_cuda_ops" >> $OUT/tests.log 2>&1; echo "rc $?"; tail -2 $OUT/tests.log
echo "=== done ($SECONDS s)"
