#!/usr/bin/env bash
# One call: the forward's 32-byte float32 lanes where they fill the rounds (wide_forward).
# base = main (HEAD); new = the working tree. MSDA GPU tests on new, A/B of GPU time (2
# rounds; w5 = new with the wide forward at five blocks per SM, 48 registers), the MSDA benchmark with the peers for new and base, the convolution benchmark
# (deformops, torchvision, dense cuDNN; not the peer's Triton convolution, whose autotuning
# does not fit the call), memcheck of the sanitizer cases on new, the other GPU tests.
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
VARIANTS="base new w5"
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
echo "=== msda tests on w5 ($SECONDS s)"
(cd .peer/v/w5 && DEFORMOPS_CACHE_DIR=/tmp/c_w5 PYTHONPATH=$PWD timeout $(lim 100 300) python -m pytest -q -p no:cacheprovider tests/gpu/test_cuda_ops.py -k msda > $OUT/tests_w5.log 2>&1; echo "rc $?"; tail -1 $OUT/tests_w5.log; python -c "import deformops; print(deformops.__file__)")
echo "=== A/B ($SECONDS s)"
for round in 1; do
  for v in $VARIANTS; do
    echo "=== $v round $round" >> $OUT/ab_profile.txt
    DEFORMOPS_CACHE_DIR=/tmp/c_$v PYTHONPATH=$(vpath $v) timeout 60 python scripts/profile_kernels.py $CASES --runs 20 >> $OUT/ab_profile.txt 2>&1
  done
done
grep -E "^=== |GPU time" $OUT/ab_profile.txt
echo "=== waiting for the peer warm-up ($SECONDS s)"; wait $PEER; echo "peer rc $?"; tail -2 /tmp/peer_build.log
echo "=== bench new with peers ($SECONDS s)"
DEFORMOPS_BACKEND=native timeout $(lim 150 120) python -m deformops.bench.cli --out $OUT --peer-path $PEERDIR --peer-timeout 120 --op msda --name msda --impl deformops pytorch-grid-sample peer-deformops-3.0.1-cuda peer-deformops-3.0.1-triton
echo "=== memcheck ($SECONDS s)"
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer | head -n1)
PYTORCH_NO_CUDA_MEMORY_CACHING=1 DEFORMOPS_BACKEND=native timeout $(lim 120 90) $SAN --tool memcheck --error-exitcode 1 --print-limit 50 --target-processes all python tests/gpu/sanitize_cases.py > $OUT/sanitizer.log 2>&1; echo "memcheck rc $?"; tail -3 $OUT/sanitizer.log
echo "=== other GPU tests ($SECONDS s)"
timeout $(lim 300 5) python -m pytest -q -p no:cacheprovider tests/gpu -k "not msda or not test_cuda_ops" >> $OUT/tests.log 2>&1; echo "rc $?"; tail -2 $OUT/tests.log
echo "=== done ($SECONDS s)"
