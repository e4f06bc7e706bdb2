#!/usr/bin/env bash
# One call on a GPU host: build, check, GPU tests, compute-sanitizer and the benchmarks.
#
#   scripts/gpu_run.sh OUTDIR        (from the repository root; no network needed)
#
# Stages, each under a time limit; a failed stage does not stop the next ones, and the
# summary at the end gives every stage's status and duration:
#   setup      install .whl/*.whl if any (--no-index), install the published peer
#              .peer/deformops-*.whl into its own --target folder ($PEERDIR); then the
#              peer's CUDA build (minutes) starts in the background, niced, so that it
#              overlaps the stages below; the benchmarks wait for it to end, so that
#              they time on a quiet GPU (log: OUTDIR/peer_build.log)
#   build      python -m deformops build --device cpu, then --device cuda, timed, into a
#              fresh cache (unless DEFORMOPS_CACHE_DIR is set): the cold build (while
#              the peer builds)
#   warm       a fresh process: import, load of the cached CUDA library, first call
#   check      python -m deformops check
#   tests      pytest tests/gpu, then the CUDA-marked tests of the rest of the suite
#   memcheck,  compute-sanitizer on tests/gpu/sanitize_cases.py, PyTorch's caching
#   racecheck  allocator off so that memcheck sees every allocation's bounds
#              (log: OUTDIR/sanitizer.log)
#   bench-msda python -m deformops bench, peers side by side, into OUTDIR/msda.json and
#   bench-conv msda.png, conv.json and conv.png, roi.json and roi.png (deformable RoI
#   bench-roi  pooling beside torchvision's roi_align, the no-offset floor); the tables
#              are printed in the log
# All output also goes to OUTDIR/gpu_run.log. The stages before the benchmarks leave
# them a reserve of time, so that a slow build or test run cannot crowd them out.
# Exit status: 0 when every stage succeeded.
#
# Environment knobs: GPU_RUN_BUDGET (seconds for the whole run, default 540), PYTHON,
# PEERDIR, PEER_CONV_PARTS (default 0; N > 0: the peer's Triton convolution is benchmarked
# too, after N background processes, started with the peer's warm-up, have compiled one
# part each of its autotuning configs into Triton's cache: OUTDIR/peer_conv_warm.log),
# BENCH_MSDA_IMPLS, BENCH_CONV_IMPLS and BENCH_ROI_IMPLS (--impl lists),
# BENCH_ARGS (more bench options, e.g. "--runs 50"; a dry run without GPU: "--device cpu
# --scale 0.0625 --runs 3 --warmup 1").
set -u -o pipefail

OUT=${1:?usage: scripts/gpu_run.sh OUTDIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/gpu_run.log") 2>&1
TEE_PID=$!

BUDGET=${GPU_RUN_BUDGET:-540}
BENCH_RESERVE=275 # seconds kept for the three benchmark stages
START=$SECONDS
# The stages before the benchmarks take about 250 s on an H100 host (330 s with
# PEER_CONV_PARTS compiling beside them); a smaller budget cuts the last of them short.
if ((BUDGET - BENCH_RESERVE < 250)); then
    echo "warning: GPU_RUN_BUDGET=$BUDGET leaves $((BUDGET - BENCH_RESERVE)) s before the benchmarks" \
        "(they need about 250 s): the tests or compute-sanitizer may be cut short" >&2
fi
PY=${PYTHON:-$(command -v python3 || command -v python)}
PEERDIR=${PEERDIR:-/tmp/deformops-peer}
PEER_WORKER=deformops/bench/peers_worker.py
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
DEFORMOPS_CACHE_DIR=${DEFORMOPS_CACHE_DIR:-$(mktemp -d /tmp/deformops-cache.XXXXXX)}
BENCH_ARGS=${BENCH_ARGS:-}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export PY PEERDIR PEER_WORKER SANITIZER DEFORMOPS_CACHE_DIR BENCH_ARGS OUT

SUMMARY=()
FAILURES=0
# stage NAME LIMIT RESERVE FUNCTION [ARGS...]: run FUNCTION in a child bash for at most
# LIMIT seconds, and no longer than leaves RESERVE seconds of the budget to later stages.
stage() {
    local name=$1 limit=$2 reserve=$3 fn=$4
    shift 4
    local left=$((BUDGET - (SECONDS - START) - reserve))
    ((limit > left)) && limit=$left
    if ((limit < 10)); then
        SUMMARY+=("$(printf '%-10s skipped: no time left' "$name")")
        FAILURES=$((FAILURES + 1))
        return
    fi
    echo
    echo "=== $name (limit $limit s, $((SECONDS - START)) s elapsed) ==="
    local t0=$SECONDS status
    timeout --kill-after=15 "$limit" bash -c "$(declare -f "$fn"); $fn \"\$@\"" "$fn" "$@"
    local rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMEOUT after $limit s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    ((rc == 0)) || FAILURES=$((FAILURES + 1))
    SUMMARY+=("$(printf '%-10s %-24s %4d s' "$name" "$status" $((SECONDS - t0)))")
}

setup() {
    shopt -s nullglob
    local wheels=(.whl/*.whl) peer=(.peer/deformops-*.whl)
    if ((${#wheels[@]})); then
        "$PY" -m pip install --no-index --find-links .whl "${wheels[@]}" ||
            echo "note: the wheels of .whl/ did not install: the tests that need them skip"
    fi
    "$PY" -c "import matplotlib" 2>/dev/null || echo "note: no matplotlib: no charts (bench --from-json elsewhere)"
    "$PY" -c "import torchvision" 2>/dev/null || echo "note: no torchvision: its records will say so"
    ((${#peer[@]})) || { echo "no peer wheel in .peer/: the peers are not measured"; return 1; }
    if [[ -f $PEERDIR/deformops/__init__.py ]]; then
        echo "the peer is already installed in $PEERDIR (its build cache is kept)"
        return 0
    fi
    "$PY" -m pip install --no-deps --no-index --target "$PEERDIR" "${peer[0]}"
}

build() {
    local t0 t1 t2
    t0=$(date +%s%N)
    "$PY" -m deformops build --device cpu || return 1
    t1=$(date +%s%N)
    "$PY" -m deformops build --device cuda || return 1
    t2=$(date +%s%N)
    echo "cold build: cpu $(((t1 - t0) / 1000000)) ms, cuda $(((t2 - t1) / 1000000)) ms"
}

warm() {
    "$PY" - <<'EOF'
import time

t0 = time.perf_counter()
import torch

import deformops
from deformops import _build

t1 = time.perf_counter()
loaded = _build.load("cuda")
t2 = time.perf_counter()
value = torch.randn(1, 5, 2, 8, device="cuda")
shapes = torch.tensor([[1, 5]], device="cuda")
starts = torch.tensor([0], device="cuda")
loc = torch.rand(1, 3, 2, 1, 2, 2, device="cuda")
attn = torch.rand(1, 3, 2, 1, 2, device="cuda")
deformops.multi_scale_deformable_attention(value, shapes, starts, loc, attn)
torch.cuda.synchronize()
t3 = time.perf_counter()
backend = deformops.backend("cuda")
print(
    f"warm start: import {t1 - t0:.2f} s, load of the cached CUDA library {t2 - t1:.2f} s"
    f" (loaded: {loaded}), first call {t3 - t2:.2f} s, backend {backend}"
)
raise SystemExit(0 if loaded else 1)
EOF
}

check() {
    "$PY" -m deformops check
}

tests() {
    local rc=0 code
    if [[ -d tests/gpu ]]; then
        "$PY" -m pytest -q -p no:cacheprovider tests/gpu || rc=1
    fi
    "$PY" -m pytest -q -p no:cacheprovider -m cuda --ignore=tests/gpu tests
    code=$?
    ((code == 5)) && echo "(no CUDA-marked tests outside tests/gpu)"
    ((code == 0 || code == 5)) || rc=1
    return $rc
}

sanitize() {
    local tool=$1 rc
    [[ -n $SANITIZER ]] || { echo "compute-sanitizer not found"; return 1; }
    [[ -f tests/gpu/sanitize_cases.py ]] || { echo "no tests/gpu/sanitize_cases.py"; return 1; }
    echo "=== $tool ===" >>"$OUT/sanitizer.log"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 DEFORMOPS_BACKEND=native "$SANITIZER" --tool "$tool" \
        --error-exitcode 1 --print-limit 50 --target-processes all \
        "$PY" tests/gpu/sanitize_cases.py >>"$OUT/sanitizer.log" 2>&1
    rc=$?
    tail -n 4 "$OUT/sanitizer.log"
    return $rc
}

bench() {
    # A failed native build must show as errors in the records, not as reference timings.
    # shellcheck disable=SC2086 # BENCH_ARGS is a list of options
    DEFORMOPS_BACKEND=native "$PY" -m deformops.bench.cli --out "$OUT" --peer-path "$PEERDIR" \
        --peer-timeout 240 $BENCH_ARGS "$@"
}

echo "=== environment ==="
date -u
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no nvidia-smi"
"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "CUDA", torch.version.cuda, "GPU", torch.cuda.is_available())'
command -v nvcc >/dev/null && nvcc --version | tail -n 2
echo "ninja: $(command -v ninja || echo 'not on PATH')"
echo "compute-sanitizer: ${SANITIZER:-not found}"
echo "cache: $DEFORMOPS_CACHE_DIR, peer folder: $PEERDIR, budget: $BUDGET s"

stage setup 90 "$BENCH_RESERVE" setup
PEER_PID=
if [[ -f $PEERDIR/deformops/__init__.py ]]; then
    echo "the peer's CUDA build starts in the background: $OUT/peer_build.log"
    timeout 480 nice -n 10 "$PY" -I "$PEER_WORKER" --peer-path "$PEERDIR" --warm \
        >"$OUT/peer_build.log" 2>&1 &
    PEER_PID=$!
fi
PEER_CONV_PARTS=${PEER_CONV_PARTS:-0}
PEER_CONV_PIDS=()
if ((PEER_CONV_PARTS > 0)) && [[ -f $PEERDIR/deformops/__init__.py ]]; then
    # One log per part outside OUTDIR (few files come back from a GPU host), joined later.
    PEER_CONV_LOGS=$(mktemp -d /tmp/peer-conv-warm.XXXXXX)
    echo "$PEER_CONV_PARTS processes compile the peer's Triton convolution configs: $OUT/peer_conv_warm.log"
    for ((part = 0; part < PEER_CONV_PARTS; part++)); do
        timeout 420 nice -n 10 "$PY" -I "$PEER_WORKER" --peer-path "$PEERDIR" \
            --warm-conv "$part" "$PEER_CONV_PARTS" >"$PEER_CONV_LOGS/$part.log" 2>&1 &
        PEER_CONV_PIDS+=($!)
    done
fi
stage build 240 "$BENCH_RESERVE" build
stage warm 60 "$BENCH_RESERVE" warm
stage check 120 "$BENCH_RESERVE" check
stage tests 240 "$BENCH_RESERVE" tests
stage memcheck 120 "$BENCH_RESERVE" sanitize memcheck
stage racecheck 120 "$BENCH_RESERVE" sanitize racecheck
# The benchmarks time on a quiet GPU: the peer's warm-up (its build, then its first
# calls) must be over before they start.
if [[ -n $PEER_PID ]]; then
    if kill -0 "$PEER_PID" 2>/dev/null; then
        echo "waiting for the peer warm-up to finish before the benchmarks"
    fi
    wait "$PEER_PID"
    echo "peer warm-up: exit code $?" >>"$OUT/peer_build.log"
    echo
    echo "=== peer build (tail) ==="
    tail -n 12 "$OUT/peer_build.log"
fi
CONV_DEFAULT="deformops torchvision cudnn-dense"
if ((${#PEER_CONV_PIDS[@]})); then
    echo "waiting for the compiles of the peer's Triton convolution configs"
    wait "${PEER_CONV_PIDS[@]}"
    cat "$PEER_CONV_LOGS"/*.log >"$OUT/peer_conv_warm.log"
    grep "conv .* s, " "$OUT/peer_conv_warm.log" | grep -v ", ok$" || echo "every part compiled"
    CONV_DEFAULT="$CONV_DEFAULT peer-deformops-3.0.1-triton"
fi
MSDA_IMPLS=${BENCH_MSDA_IMPLS:-deformops pytorch-grid-sample peer-deformops-3.0.1-cuda peer-deformops-3.0.1-triton}
CONV_IMPLS=${BENCH_CONV_IMPLS:-$CONV_DEFAULT}
ROI_IMPLS=${BENCH_ROI_IMPLS:-deformops torchvision reference}
# shellcheck disable=SC2086 # the impl lists are lists
stage bench-msda 330 125 bench --op msda --name msda --impl $MSDA_IMPLS
# shellcheck disable=SC2086
stage bench-conv 300 45 bench --op conv --name conv --impl $CONV_IMPLS
# shellcheck disable=SC2086
stage bench-roi 45 0 bench --op roi --name roi --impl $ROI_IMPLS

echo
echo "=== summary ($((SECONDS - START)) s of $BUDGET) ==="
printf '%s\n' "${SUMMARY[@]}"
ls -l "$OUT"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null
((FAILURES == 0))
