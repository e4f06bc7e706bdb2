#!/usr/bin/env bash
# One lean call (branch msda-binned), most important first: build; the dense MSDA GPU
# cases and the binned-metadata test, with memcheck of every GPU case concurrently, while
# the peer warms up; A/B GPU time base (main) vs new; the MSDA benchmark with the peers;
# ncu of new's m2f_enc fp32 kernels; then the rest of the MSDA GPU tests.
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
echo "=== dense msda tests, memcheck concurrently ($SECONDS s)"
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer | head -n1)
(PYTORCH_NO_CUDA_MEMORY_CACHING=1 DEFORMOPS_BACKEND=native timeout 120 $SAN --tool memcheck --error-exitcode 1 --print-limit 50 --target-processes all python tests/gpu/sanitize_cases.py > $OUT/sanitizer.log 2>&1; echo "memcheck rc $?" >> $OUT/sanitizer.log) &
S=$!
timeout 90 python -m pytest -q -p no:cacheprovider tests/gpu/test_cuda_ops.py -k "msda and (Q2048 or Q4096 or binned or non_finite)" > $OUT/tests_dense.log 2>&1; echo "tests rc $?"; tail -3 $OUT/tests_dense.log
wait $B; tail -1 /tmp/build_base.log
CASES="m2f_enc:fp32 m2f_enc:bf16 m2f_enc:fp16 detr_enc:fp32 detr_dec:fp32"
echo "=== A/B ($SECONDS s)"
echo "=== base" >> $OUT/ab_profile.txt
DEFORMOPS_CACHE_DIR=/tmp/c_base PYTHONPATH=$PWD/.peer/base2 timeout 40 python scripts/profile_kernels.py $CASES --runs 20 >> $OUT/ab_profile.txt 2>&1
echo "=== new" >> $OUT/ab_profile.txt
timeout 40 python scripts/profile_kernels.py $CASES --runs 20 >> $OUT/ab_profile.txt 2>&1
grep -E "^=== |GPU time" $OUT/ab_profile.txt
grep -A12 "^=== new$" $OUT/ab_profile.txt | head -14 | cut -c1-110
wait $S; tail -3 $OUT/sanitizer.log
echo "=== waiting for the peer warm-up ($SECONDS s)"; wait $PEER; echo "peer rc $?"; tail -1 /tmp/peer_build.log
echo "=== bench m2f_enc, with peers ($SECONDS s)"
DEFORMOPS_BACKEND=native timeout 100 python -m deformops.bench.cli --out $OUT --peer-path $PEERDIR --peer-timeout 100 --op msda --workload m2f_enc --name msda --impl deformops peer-deformops-3.0.1-cuda peer-deformops-3.0.1-triton 2>&1 | grep -v "^\[" | grep "| deformops \|triton\|cuda "
echo "=== ncu, new m2f_enc fp32: the binned scatter's kernels and the gather-only backward ($SECONDS s)"
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu | head -n1)
M1="breakdown:lts__throughput.avg.pct_of_peak_sustained_elapsed,breakdown:l1tex__throughput.avg.pct_of_peak_sustained_elapsed,gpu__time_duration.sum,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum"
timeout 90 $NCU -k regex:"bin_|msda_backward" --launch-skip 12 --launch-count 4 --metrics $M1 python scripts/profile_kernels.py m2f_enc:fp32 --runs 1 > $OUT/ncu_new.txt 2>&1; echo "rc $?"
grep -E "bin_|msda_|gpu__time|xbar2lts|ltcfabric2ltc|lts2xbar|lsu_wavefronts|warps_active|inst_executed" $OUT/ncu_new.txt | cut -c1-120
echo "=== other msda tests ($SECONDS s)"
timeout 120 python -m pytest -q -p no:cacheprovider tests/gpu/test_cuda_ops.py -k "msda and not (Q2048 or Q4096 or binned or non_finite)" > $OUT/tests.log 2>&1; echo "rc $?"; tail -2 $OUT/tests.log
echo "=== non-finite tests on CUDA and the RoI pooling GPU tests (sampling.h guard) ($SECONDS s)"
timeout 90 python -m pytest -q -p no:cacheprovider -m cuda tests/test_non_finite.py > $OUT/tests_non_finite.log 2>&1; echo "rc $?"; tail -2 $OUT/tests_non_finite.log
timeout 60 python -m pytest -q -p no:cacheprovider tests/gpu/test_cuda_roi_pool.py > $OUT/tests_roi.log 2>&1; echo "rc $?"; tail -2 $OUT/tests_roi.log
echo "=== done ($SECONDS s)"
