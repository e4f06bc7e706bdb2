#!/usr/bin/env bash
# One call (branch msda-zero-ahead): the backward zeroes the value gradient itself, a pair
# ahead of the blocks that add into it (DEFORMOPS_MSDA_ZERO_AHEAD=1), instead of a memset.
# base = main; new with the knob off (0: the cost of the extra code) and on (1). MSDA GPU
# tests and memcheck with it on while the peer warms up; A/B GPU time (2 rounds); the MSDA
# benchmark with the peers, knob on; ncu of main's m2f_enc fp32 kernels: which part of
# the L2 (and L1) bounds them (breakdown of the throughput metrics, sectors by operation).
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
echo "=== msda tests, zero ahead ($SECONDS s)"
DEFORMOPS_MSDA_ZERO_AHEAD=1 timeout 100 python -m pytest -q -p no:cacheprovider tests/gpu/test_cuda_ops.py -k msda > $OUT/tests.log 2>&1; echo "rc $?"; tail -1 $OUT/tests.log
echo "=== memcheck, zero ahead ($SECONDS s)"
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer | head -n1)
DEFORMOPS_MSDA_ZERO_AHEAD=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 DEFORMOPS_BACKEND=native timeout 90 $SAN --tool memcheck --error-exitcode 1 --print-limit 50 --target-processes all python tests/gpu/sanitize_cases.py > $OUT/sanitizer.log 2>&1; echo "memcheck rc $?"; tail -2 $OUT/sanitizer.log
echo "=== waiting for the peer warm-up ($SECONDS s)"; wait $PEER; echo "peer rc $?"; tail -1 /tmp/peer_build.log
CASES="m2f_enc:fp32 m2f_enc:fp16 m2f_enc:bf16 detr_enc:fp32 detr_enc:fp16 detr_enc:bf16 detr_dec:fp32 detr_dec:fp16 detr_dec:bf16"
echo "=== A/B ($SECONDS s)"
for round in 1 2; do
  echo "=== base round $round" >> $OUT/ab_profile.txt
  DEFORMOPS_CACHE_DIR=/tmp/c_base PYTHONPATH=$PWD/.peer/base2 timeout 60 python scripts/profile_kernels.py $CASES --runs 20 >> $OUT/ab_profile.txt 2>&1
  for Z in 0 1; do
    echo "=== zero-ahead=$Z round $round" >> $OUT/ab_profile.txt
    DEFORMOPS_MSDA_ZERO_AHEAD=$Z timeout 60 python scripts/profile_kernels.py $CASES --runs 20 >> $OUT/ab_profile.txt 2>&1
  done
done
grep -E "^=== |GPU time" $OUT/ab_profile.txt
echo "=== bench, zero ahead, with peers ($SECONDS s)"
DEFORMOPS_MSDA_ZERO_AHEAD=1 DEFORMOPS_BACKEND=native timeout 120 python -m deformops.bench.cli --out $OUT --peer-path $PEERDIR --peer-timeout 100 --op msda --name msda --impl deformops pytorch-grid-sample peer-deformops-3.0.1-cuda peer-deformops-3.0.1-triton 2>&1 | grep -v "^\["
echo "=== ncu breakdown, base ($SECONDS s)"
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu | head -n1)
M1="breakdown:lts__throughput.avg.pct_of_peak_sustained_elapsed,breakdown:l1tex__throughput.avg.pct_of_peak_sustained_elapsed,lts__t_sectors_op_read.sum,lts__t_sectors_op_red.sum,lts__t_sectors_op_write.sum,lts__t_requests_op_read.sum,lts__t_requests_op_red.sum,gpu__time_duration.sum"
(cd /tmp && DEFORMOPS_CACHE_DIR=/tmp/c_base PYTHONPATH=$OLDPWD/.peer/base2 timeout 120 $NCU -k regex:msda_ --launch-skip 6 --launch-count 2 --metrics $M1 python $OLDPWD/scripts/profile_kernels.py m2f_enc:fp32 --runs 1) > $OUT/ncu_breakdown.txt 2>&1; echo "rc $?"
grep -vE "^==PROF==|^deformops|^ *$" $OUT/ncu_breakdown.txt | tail -80 | cut -c1-130
M2="lts__t_sectors_srcunit_ltcfabric.sum,lts__t_sectors_srcunit_tex.sum,lts__t_sectors.sum"
(cd /tmp && DEFORMOPS_CACHE_DIR=/tmp/c_base PYTHONPATH=$OLDPWD/.peer/base2 timeout 60 $NCU -k regex:msda_backward --launch-skip 3 --launch-count 1 --metrics $M2 python $OLDPWD/scripts/profile_kernels.py m2f_enc:fp32 --runs 1) > $OUT/ncu_fabric.txt 2>&1; echo "rc $?"
grep -vE "^==PROF==|^deformops|^ *$" $OUT/ncu_fabric.txt | tail -12 | cut -c1-130
echo "=== done ($SECONDS s)"
