#!/usr/bin/env bash
# Branch msda-paired-locations (the tree): one 8-byte load per float32 location (x, y)
# instead of two 4-byte loads, against base (main at ae45cee: blocks of one warp, t896).
# Build both (peer warm-up in the background), GPU time per forward+backward (two rounds),
# the harness's m2f_enc fp32 timing (two rounds); if the branch is faster on m2f_enc fp32 in
# the harness: its MSDA GPU tests, memcheck of its sanitizer cases, then (after the peer
# warm-up) the MSDA benchmark with the peers.
set -u
exec > >(tee -a $OUT/run.log) 2>&1
export PYTHONUNBUFFERED=1
R=$PWD
PEERDIR=/tmp/deformops-peer
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch, torchvision, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', torchvision.__version__, 'triton', triton.__version__)"
python -m pip install -q --no-deps --no-index --target $PEERDIR .peer/deformops-3.0.1-py3-none-any.whl
timeout 300 nice -n 10 python -I deformops/bench/peers_worker.py --peer-path $PEERDIR --warm > /tmp/peer_build.log 2>&1 &
PEER=$!
VARIANTS="base paired"
vdir() { if [ $1 = base ]; then echo $R/.peer/base2; else echo $R; fi; }
export DEFORMOPS_CACHE_DIR=/tmp/c
PIDS=""
for v in $VARIANTS; do
  (cd /tmp && export PYTHONPATH=$(vdir $v) && timeout 240 python -m deformops build --device cuda > /tmp/build_$v.log 2>&1 && timeout 240 python -m deformops build --device cpu >> /tmp/build_$v.log 2>&1; echo "$v build rc $?") &
  PIDS="$PIDS $!"
done
wait $PIDS
echo "=== A/B GPU time ($SECONDS s)"
C1="m2f_enc:fp32 m2f_enc:bf16 m2f_enc:fp16 detr_enc:fp32 detr_enc:bf16 detr_dec:fp32"
for round in 1 2; do
  for v in $VARIANTS; do
    echo "=== $v round $round" >> $OUT/ab.txt
    (cd /tmp && PYTHONPATH=$(vdir $v) timeout 60 python $R/scripts/profile_kernels.py $C1 --runs 20 >> $OUT/ab.txt 2>&1)
  done
done
grep -E "^=== |GPU time" $OUT/ab.txt | sed 's/ deterministic=False//; s/ of GPU time per forward+backward//'
echo "=== harness m2f_enc fp32, deformops only ($SECONDS s)"
for round in 1 2; do
  for v in $VARIANTS; do
    (cd /tmp && PYTHONPATH=$(vdir $v) DEFORMOPS_BACKEND=native timeout 60 python -m deformops.bench.cli --out /tmp/h_${v}_$round --op msda --workload m2f_enc --dtype fp32 --name msda --impl deformops 2>&1 | grep '| msda' | sed "s/^/$v $round /")
  done
done | tee /tmp/harness.txt
BEST=$(awk -F'|' '{split($1,a," "); t[a[1]]+=$7} END {for (v in t) print t[v], v}' /tmp/harness.txt | sort -n | head -1 | awk '{print $2}')
echo "=== faster by the harness on m2f_enc fp32: $BEST ($SECONDS s)"
if [ "$BEST" != paired ]; then echo "=== done ($SECONDS s)"; exit 0; fi
echo "=== the branch's MSDA GPU tests and non-finite CUDA tests ($SECONDS s)"
(cd /tmp && PYTHONPATH=$R timeout 120 python -m pytest -q -p no:cacheprovider $R/tests/gpu/test_cuda_ops.py -k msda > $OUT/tests.log 2>&1; echo "rc $?"; tail -n 1 $OUT/tests.log)
(cd /tmp && PYTHONPATH=$R timeout 60 python -m pytest -q -p no:cacheprovider -m cuda $R/tests/test_non_finite.py -k msda >> $OUT/tests.log 2>&1; echo "rc $?"; tail -n 1 $OUT/tests.log)
echo "=== memcheck of the branch's sanitizer cases ($SECONDS s)"
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer | head -n1)
(cd /tmp && PYTHONPATH=$R PYTORCH_NO_CUDA_MEMORY_CACHING=1 DEFORMOPS_BACKEND=native timeout 150 $SAN --tool memcheck --error-exitcode 1 --print-limit 50 --target-processes all python $R/tests/gpu/sanitize_cases.py > $OUT/sanitizer.log 2>&1; echo "memcheck rc $?" >> $OUT/sanitizer.log)
tail -3 $OUT/sanitizer.log
echo "=== waiting for the peer warm-up ($SECONDS s)"; wait $PEER; echo "peer rc $?"; tail -1 /tmp/peer_build.log
echo "=== the MSDA benchmark with the peers, the branch ($SECONDS s)"
mkdir -p $OUT/record
(cd /tmp && PYTHONPATH=$R DEFORMOPS_BACKEND=native timeout 150 python -m deformops.bench.cli --out $OUT/record --peer-path $PEERDIR --peer-timeout 120 --op msda --name msda --impl deformops pytorch-grid-sample peer-deformops-3.0.1-cuda peer-deformops-3.0.1-triton 2>&1 | grep -v "^\[" | grep "| msda")
echo "=== done ($SECONDS s)"
