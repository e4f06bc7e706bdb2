#!/usr/bin/env bash
# One call (branch msda-sm-groups): SM groups (DEFORMOPS_MSDA_GROUPS=G, default 1: a
# persistent grid; group g of the SMs takes pairs g, g+G, ...). base = main. MSDA GPU tests
# under G = 1 and 4 while the peer warms up; A/B GPU time (2 rounds) of base, G = 1, 2, 4, 8;
# the MSDA benchmark with the peers under G = 4; ncu of m2f_enc fp32 at G = 1 and 4.
set -u
exec > >(tee -a $OUT/run.log) 2>&1
export PYTHONUNBUFFERED=1
PEERDIR=/tmp/deformops-peer
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', torchvision.__version__)"
python -m pip install -q --no-deps --no-index --target $PEERDIR .peer/deformops-3.0.1-py3-none-any.whl
timeout 300 nice -n 10 python -I deformops/bench/peers_worker.py --peer-path $PEERDIR --warm > /tmp/peer_build.log 2>&1 &
PEER=$!
(cd /tmp && DEFORMOPS_CACHE_DIR=/tmp/c_base PYTHONPATH=$OLDPWD/.peer/base2 python -m deformops build --device cuda > /tmp/build_base.log 2>&1) &
B=$!
export PYTHONPATH=$PWD DEFORMOPS_CACHE_DIR=/tmp/c_new
python -m deformops build --device cuda | tail -1
wait $B; tail -1 /tmp/build_base.log
python -m deformops build --device cpu | tail -1
for G in 1 4; do
  echo "=== msda tests G=$G ($SECONDS s)"
  DEFORMOPS_MSDA_GROUPS=$G timeout 100 python -m pytest -q -p no:cacheprovider tests/gpu/test_cuda_ops.py -k msda > $OUT/tests_g$G.log 2>&1; echo "rc $?"; tail -1 $OUT/tests_g$G.log
done
echo "=== waiting for the peer warm-up ($SECONDS s)"; wait $PEER; echo "peer rc $?"; tail -1 /tmp/peer_build.log
CASES="m2f_enc:fp32 m2f_enc:fp16 m2f_enc:bf16 detr_enc:fp32 detr_dec:fp32"
echo "=== A/B ($SECONDS s)"
for round in 1 2; do
  echo "=== base round $round" >> $OUT/ab_profile.txt
  DEFORMOPS_CACHE_DIR=/tmp/c_base PYTHONPATH=$PWD/.peer/base2 timeout 50 python scripts/profile_kernels.py $CASES --runs 20 >> $OUT/ab_profile.txt 2>&1
  for G in 1 2 4 8; do
    echo "=== G=$G round $round" >> $OUT/ab_profile.txt
    DEFORMOPS_MSDA_GROUPS=$G timeout 50 python scripts/profile_kernels.py $CASES --runs 20 >> $OUT/ab_profile.txt 2>&1
  done
done
grep -E "^=== |GPU time" $OUT/ab_profile.txt
echo "=== bench G=4 with peers ($SECONDS s)"
DEFORMOPS_MSDA_GROUPS=4 DEFORMOPS_BACKEND=native timeout 120 python -m deformops.bench.cli --out $OUT --peer-path $PEERDIR --peer-timeout 100 --op msda --name msda --impl deformops pytorch-grid-sample peer-deformops-3.0.1-cuda peer-deformops-3.0.1-triton 2>&1 | grep -v "^\["
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu | head -n1)
for G in 1 4; do
  DEFORMOPS_MSDA_GROUPS=$G timeout 60 $NCU -k regex:msda_ --launch-skip 6 --launch-count 2 --section SpeedOfLight --section MemoryWorkloadAnalysis python scripts/profile_kernels.py m2f_enc:fp32 --runs 1 > $OUT/ncu_g$G.txt 2>&1
  echo "== ncu G=$G"; grep -E "msda_|Duration|L1/TEX Cache Throughput|L2 Cache Throughput|L1/TEX Hit|L2 Hit|DRAM Through" $OUT/ncu_g$G.txt | cut -c1-100
done
echo "=== done ($SECONDS s)"
