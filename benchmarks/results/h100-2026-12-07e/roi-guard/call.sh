#!/usr/bin/env bash
# RoI pooling on CUDA, fp32: main (sampling.h guard) vs 29c6d9d (before); libraries cached from the last call.
set -u
exec > >(tee -a $OUT/run.log) 2>&1
for round in 1 2; do
  for v in old new; do
    P=$PWD; [ $v = old ] && P=$PWD/.peer/base_old
    echo "=== $v round $round ($SECONDS s)"
    DEFORMOPS_CACHE_DIR=/tmp/c_$v PYTHONPATH=$P DEFORMOPS_BACKEND=native timeout 40 python -m deformops.bench.cli --out $OUT/$v$round --op roi --dtype fp32 --name roi --impl deformops --runs 30 --warmup 5 2>&1 | grep -i "roi_k512\|error" | head -3
  done
done
echo "=== done ($SECONDS s)"
