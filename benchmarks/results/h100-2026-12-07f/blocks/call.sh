#!/usr/bin/env bash
# Branch msda-tail, second call. Variants: base (main), b64 (blocks of 64 threads, backward
# at 768 threads per SM), t896 (the branch: b64 with the float32-accumulating fast-path
# backward at 896 threads per SM, 72 registers), b32t896 (t896 with blocks of 32 threads).
# Build all in parallel (peer warm-up in the background), GPU time per forward+backward
# (profile_kernels, two rounds), then with the peer warm-up done the harness's m2f_enc fp32 /
# detr_dec fp32 timing (two rounds, deformops only), pick the fastest variant on m2f_enc fp32
# by the harness, run the MSDA benchmark of record with the peers for it, memcheck it, and run
# its MSDA GPU tests as far as time allows.
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
VARIANTS="base b64 t896 b32t896"
vdir() { if [ $1 = base ]; then echo $R/.peer/base2; else echo $R/.peer/v/$1; fi; }
export DEFORMOPS_CACHE_DIR=/tmp/c
PIDS=""
for v in $VARIANTS; do
  (cd /tmp && export PYTHONPATH=$(vdir $v) && timeout 240 python -m deformops build --device cuda > /tmp/build_$v.log 2>&1 && timeout 240 python -m deformops build --device cpu >> /tmp/build_$v.log 2>&1; echo "$v build rc $?") &
  PIDS="$PIDS $!"
done
wait $PIDS
grep -h "compiled" /tmp/build_*.log | cut -c1-100
echo "=== A/B GPU time ($SECONDS s)"
C1="m2f_enc:fp32 m2f_enc:bf16 m2f_enc:fp16 detr_enc:fp32 detr_enc:bf16 detr_dec:fp32"
C2="m2f_enc:fp32 m2f_enc:bf16 detr_enc:fp32 detr_dec:fp32"
for round in 1 2; do
  [ $round = 1 ] && CASES=$C1 || CASES=$C2
  for v in $VARIANTS; do
    echo "=== $v round $round" >> $OUT/ab.txt
    (cd /tmp && PYTHONPATH=$(vdir $v) timeout 60 python $R/scripts/profile_kernels.py $CASES --runs 20 >> $OUT/ab.txt 2>&1)
  done
done
grep -E "^=== |GPU time" $OUT/ab.txt | sed 's/ deterministic=False//; s/ of GPU time per forward+backward//'
echo "=== waiting for the peer warm-up ($SECONDS s)"; wait $PEER; echo "peer rc $?"; tail -1 /tmp/peer_build.log
echo "=== harness m2f_enc / detr_dec fp32, deformops only ($SECONDS s)"
for round in 1 2; do
  for v in $VARIANTS; do
    (cd /tmp && PYTHONPATH=$(vdir $v) DEFORMOPS_BACKEND=native timeout 60 python -m deformops.bench.cli --out /tmp/h_${v}_$round --op msda --workload m2f_enc detr_dec --dtype fp32 --name msda --impl deformops 2>&1 | grep '| msda' | sed "s/^/$v $round /")
  done
done | tee /tmp/harness.txt
BEST=$(grep "m2f_enc" /tmp/harness.txt | grep -v "^base" | awk -F'|' '{split($1,a," "); t[a[1]]+=$7} END {for (v in t) print t[v], v}' | sort -n | head -1 | awk '{print $2}')
echo "=== best by the harness on m2f_enc fp32: $BEST; MSDA benchmark of record with the peers ($SECONDS s)"
mkdir -p $OUT/record
(cd /tmp && PYTHONPATH=$(vdir $BEST) DEFORMOPS_BACKEND=native timeout 150 python -m deformops.bench.cli --out $OUT/record --peer-path $PEERDIR --peer-timeout 120 --op msda --name msda --impl deformops pytorch-grid-sample peer-deformops-3.0.1-cuda peer-deformops-3.0.1-triton 2>&1 | grep -v "^\[" | grep "| msda")
echo "=== memcheck of $BEST's sanitizer cases ($SECONDS s)"
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer | head -n1)
(cd /tmp && PYTHONPATH=$(vdir $BEST) PYTORCH_NO_CUDA_MEMORY_CACHING=1 DEFORMOPS_BACKEND=native timeout 150 $SAN --tool memcheck --error-exitcode 1 --print-limit 50 --target-processes all python $R/tests/gpu/sanitize_cases.py > $OUT/sanitizer.log 2>&1; echo "memcheck rc $?" >> $OUT/sanitizer.log)
tail -3 $OUT/sanitizer.log
left() { echo $((580 - SECONDS)); }
echo "=== $BEST: MSDA GPU tests, non-finite CUDA tests ($SECONDS s, $(left) s left)"
(cd /tmp && PYTHONPATH=$(vdir $BEST) timeout $(( $(left) > 10 ? $(left) : 10 )) python -m pytest -q -p no:cacheprovider $R/tests/gpu/test_cuda_ops.py -k msda > $OUT/tests.log 2>&1; echo "rc $?"; tail -n 1 $OUT/tests.log)
(cd /tmp && PYTHONPATH=$(vdir $BEST) timeout $(( $(left) > 10 ? $(left) : 10 )) python -m pytest -q -p no:cacheprovider -m cuda $R/tests/test_non_finite.py -k msda >> $OUT/tests.log 2>&1; echo "rc $?"; tail -n 1 $OUT/tests.log)
echo "=== done ($SECONDS s)"
