#!/usr/bin/env bash
# One call on a host with two or more GPUs (issue 10): the multi-GPU tests (NCCL DDP and
# FSDP2 under torchrun against one GPU, device guard and streams, one JIT build for all
# ranks), then the benchmark of both ops on cuda:0 alone and on cuda:0 and cuda:1 at the
# same time (no slowdown from multi-process use). Logs and JSON under OUTDIR.
#
#   scripts/multi_gpu_run.sh OUTDIR        (from the repository root)
set -u -o pipefail
OUT=${1:?usage: scripts/multi_gpu_run.sh OUTDIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/multi_gpu_run.log") 2>&1
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export DEFORMOPS_CACHE_DIR=${DEFORMOPS_CACHE_DIR:-$(mktemp -d /tmp/deformops-cache.XXXXXX)}
FAILURES=0
nvidia-smi -L
echo "=== tests (torch $("$PY" -c 'import torch; print(torch.__version__)'))"
"$PY" -m pytest -v -s -p no:cacheprovider tests/gpu/test_multi_gpu.py || FAILURES=$((FAILURES + 1))
BENCH=(-m deformops bench --impl deformops --runs 50 --op msda conv)
# Each benchmark process sees one GPU (its CUDA events time that device's streams).
echo "=== bench: GPU 0 alone"
CUDA_VISIBLE_DEVICES=0 "$PY" "${BENCH[@]}" --out "$OUT/solo" --name solo || FAILURES=$((FAILURES + 1))
echo "=== bench: GPUs 0 and 1 at the same time"
CUDA_VISIBLE_DEVICES=0 "$PY" "${BENCH[@]}" --out "$OUT/pair0" --name pair0 &
PID0=$!
CUDA_VISIBLE_DEVICES=1 "$PY" "${BENCH[@]}" --out "$OUT/pair1" --name pair1 || FAILURES=$((FAILURES + 1))
wait "$PID0" || FAILURES=$((FAILURES + 1))
echo "=== summary: $FAILURES failed step(s); compare solo/solo.json with pair0/ and pair1/"
((FAILURES == 0))
