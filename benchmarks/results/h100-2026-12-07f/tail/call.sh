#!/usr/bin/env bash
# Tail and prefetch A/B (branch msda-tail). Build main ("base") and five variants of the
# MSDA forward/backward in parallel: blocks of 256/128/64 threads (kSampleBlock), with and
# without the L2 prefetch of the next (n, m) pair's rows. Then GPU time per forward+backward
# (profile_kernels, two interleaved rounds), the harness's m2f_enc fp32 timing (flushed L2,
# CUDA events; two interleaved rounds, deformops only), and ncu of the tail for base/b128pf.
set -u
exec > >(tee -a $OUT/run.log) 2>&1
export PYTHONUNBUFFERED=1
R=$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
VARIANTS="base b256pf b128 b128pf b64 b64pf"
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
C1="m2f_enc:fp32 m2f_enc:bf16 m2f_enc:fp16 detr_enc:fp32 detr_dec:fp32"
C2="m2f_enc:fp32 detr_enc:fp32 detr_dec:fp32"
for round in 1 2; do
  [ $round = 1 ] && CASES=$C1 || CASES=$C2
  for v in $VARIANTS; do
    echo "=== $v round $round" >> $OUT/ab.txt
    (cd /tmp && PYTHONPATH=$(vdir $v) timeout 60 python $R/scripts/profile_kernels.py $CASES --runs 20 >> $OUT/ab.txt 2>&1)
  done
done
grep -E "^=== |GPU time" $OUT/ab.txt | sed 's/ deterministic=False//; s/ of GPU time per forward+backward//'
echo "=== harness m2f_enc fp32, deformops only ($SECONDS s)"
for round in 1 2; do
  for v in $VARIANTS; do
    echo "$v round $round: $(cd /tmp && PYTHONPATH=$(vdir $v) DEFORMOPS_BACKEND=native timeout 60 python -m deformops.bench.cli --out /tmp/bench_${v}_$round --op msda --workload m2f_enc detr_dec --dtype fp32 --name msda --impl deformops 2>&1 | grep '| msda' | tr '\n' ' ')"
  done
done
echo "=== ncu tail, m2f_enc fp32 ($SECONDS s)"
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu | head -n1)
M="gpu__time_duration.sum,sm__cycles_active.avg,sm__cycles_active.max,sm__cycles_elapsed.max,launch__grid_size,launch__waves_per_multiprocessor,lts__t_sector_hit_rate.pct,dram__bytes_read.sum,dram__bytes_write.sum,lts__xbar2lts_cycles_active.avg.pct_of_peak_sustained_elapsed,l1tex__data_pipe_lsu_wavefronts.avg.pct_of_peak_sustained_elapsed"
for v in base b128pf b64pf; do
  echo "=== ncu $v" >> $OUT/ncu.txt
  (cd /tmp && PYTHONPATH=$(vdir $v) timeout 60 $NCU -k regex:msda_ --launch-skip 6 --launch-count 2 --metrics $M python $R/scripts/profile_kernels.py m2f_enc:fp32 --runs 1 >> $OUT/ncu.txt 2>&1)
done
grep -E "^=== ncu|msda_|gpu__time|sm__cycles|grid_size|waves|hit_rate|dram__bytes|xbar2lts|lsu_wave" $OUT/ncu.txt | cut -c1-110
echo "=== done ($SECONDS s)"
