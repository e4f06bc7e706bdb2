#!/usr/bin/env bash
# An A/B comparison of variants of the package on a GPU host, in one call.
#
#   scripts/ab_run.sh OUTDIR NAME [NAME ...]      (from the repository root)
#
# NAME is `tree` (the working tree) or a variant that scripts/ab_prepare.sh put in
# .peer/v/NAME. In order:
#   1. the published peer (.peer/deformops-*.whl, if there) is installed into $PEERDIR and
#      its CUDA build starts in the background, niced;
#   2. every variant's CUDA and CPU libraries are built in parallel, into one cache;
#   3. with AB_TESTS=NAME, that variant's MSDA GPU tests, the CUDA-marked tests of
#      tests/test_non_finite.py and compute-sanitizer memcheck of its sanitizer cases
#      (OUTDIR/tests.log, OUTDIR/sanitizer.log);
#   4. once the peer's build has ended (a quiet GPU): AB_ROUNDS interleaved rounds of
#      scripts/profile_kernels.py over AB_CASES for every variant (GPU time per
#      forward+backward and per kernel: OUTDIR/ab.txt), then AB_ROUNDS interleaved rounds
#      of the benchmark harness (CUDA events, L2 flushed, deformops only) on each
#      WORKLOAD:DTYPE of AB_HARNESS (OUTDIR/harness.txt: forward and forward+backward ms);
#   5. with AB_RECORD=NAME, or `best` (the variant of least summed forward+backward time
#      in the harness), the MSDA benchmark of that variant with the peers side by side
#      (OUTDIR/record/msda.json and msda.png).
# Environment: AB_CASES (profile_kernels cases; default m2f_enc fp32, bf16 and fp16,
# detr_enc fp32 and bf16, detr_dec fp32),
# AB_ROUNDS (2), AB_HARNESS (default m2f_enc:fp32), AB_TESTS, AB_RECORD (default: none),
# PYTHON, PEERDIR (/tmp/deformops-peer), DEFORMOPS_CACHE_DIR (/tmp/deformops-ab-cache).
# Every step runs under a time limit; all output also goes to OUTDIR/ab_run.log.
set -u -o pipefail

OUT=${1:?usage: scripts/ab_run.sh OUTDIR NAME [NAME ...]}
shift
(($#)) || { echo "usage: scripts/ab_run.sh OUTDIR NAME [NAME ...]" >&2; exit 2; }
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/ab_run.log") 2>&1

ROOT=$PWD
VARIANTS=("$@")
CASES=${AB_CASES:-m2f_enc:fp32 m2f_enc:bf16 m2f_enc:fp16 detr_enc:fp32 detr_enc:bf16 detr_dec:fp32}
ROUNDS=${AB_ROUNDS:-2}
HARNESS=${AB_HARNESS:-m2f_enc:fp32}
PY=${PYTHON:-$(command -v python3 || command -v python)}
PEERDIR=${PEERDIR:-/tmp/deformops-peer}
export DEFORMOPS_CACHE_DIR=${DEFORMOPS_CACHE_DIR:-/tmp/deformops-ab-cache}
export PYTHONUNBUFFERED=1

# The folder whose `deformops` package a variant is.
vdir() {
    if [[ $1 == tree ]]; then echo "$ROOT"; else echo "$ROOT/.peer/v/$1"; fi
}
for v in "${VARIANTS[@]}"; do
    [[ -d $(vdir "$v")/deformops ]] || { echo "ab_run: no variant $v (scripts/ab_prepare.sh)" >&2; exit 2; }
done
# in_variant NAME LIMIT COMMAND...: COMMAND from /tmp (so that the working tree's package
# does not shadow the variant's) with the variant first on the import path.
in_variant() {
    local dir
    dir=$(vdir "$1")
    (cd /tmp && PYTHONPATH=$dir DEFORMOPS_BACKEND=native timeout "$2" "${@:3}")
}

date -u
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
echo "variants: ${VARIANTS[*]}; cases: $CASES; harness: $HARNESS; rounds: $ROUNDS"

PEER_PID=
peer=(.peer/deformops-*.whl)
if [[ -f ${peer[0]} ]]; then
    "$PY" -m pip install -q --no-deps --no-index --target "$PEERDIR" "${peer[0]}"
    timeout 300 nice -n 10 "$PY" -I deformops/bench/peers_worker.py --peer-path "$PEERDIR" \
        --warm >"$OUT/peer_build.log" 2>&1 &
    PEER_PID=$!
fi

echo "=== build ($SECONDS s)"
pids=()
for v in "${VARIANTS[@]}"; do
    (log=/tmp/ab_build_$v.log
    in_variant "$v" 300 "$PY" -m deformops build --device cuda >"$log" 2>&1 &&
        in_variant "$v" 300 "$PY" -m deformops build --device cpu >>"$log" 2>&1
    rc=$?
    if ((rc)); then echo "$v: build failed (rc $rc): $(tail -n 3 "$log")"; else
        echo "$v: built; $(grep -h compiled "$log" | cut -c1-90 | tr '\n' ' ')"; fi) &
    pids+=($!)
done
wait "${pids[@]}"

if [[ -n ${AB_TESTS:-} ]]; then
    t=$AB_TESTS
    tests=$(vdir "$t")/tests
    echo "=== $t: MSDA GPU tests, non-finite CUDA tests ($SECONDS s)"
    in_variant "$t" 200 "$PY" -m pytest -q -p no:cacheprovider "$tests/gpu/test_cuda_ops.py" -k msda \
        >"$OUT/tests.log" 2>&1
    echo "rc $?: $(tail -n 1 "$OUT/tests.log")"
    in_variant "$t" 100 "$PY" -m pytest -q -p no:cacheprovider -m cuda "$tests/test_non_finite.py" \
        >>"$OUT/tests.log" 2>&1
    echo "rc $?: $(tail -n 1 "$OUT/tests.log")"
    grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20
    echo "=== $t: compute-sanitizer memcheck of the sanitizer cases ($SECONDS s)"
    sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer | head -n 1)
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 in_variant "$t" 200 "$sanitizer" --tool memcheck \
        --error-exitcode 1 --print-limit 50 --target-processes all "$PY" "$tests/gpu/sanitize_cases.py" \
        >"$OUT/sanitizer.log" 2>&1
    echo "memcheck rc $?: $(grep -h "ERROR SUMMARY" "$OUT/sanitizer.log" | tail -n 1)"
fi

if [[ -n $PEER_PID ]]; then
    echo "=== waiting for the peer's build ($SECONDS s)"
    wait "$PEER_PID"
    echo "peer build rc $?"
fi

echo "=== GPU time per forward+backward, $ROUNDS rounds ($SECONDS s)"
for ((round = 1; round <= ROUNDS; round++)); do
    for v in "${VARIANTS[@]}"; do
        echo "=== $v round $round" >>"$OUT/ab.txt"
        # shellcheck disable=SC2086
        in_variant "$v" 120 "$PY" "$ROOT/scripts/profile_kernels.py" $CASES --runs 20 >>"$OUT/ab.txt" 2>&1
    done
done
grep -E "^=== |GPU time" "$OUT/ab.txt" | sed 's/ deterministic=False//; s/ of GPU time per forward+backward//'

echo "=== the harness, deformops only, $ROUNDS rounds ($SECONDS s)"
for ((round = 1; round <= ROUNDS; round++)); do
    for v in "${VARIANTS[@]}"; do
        for spec in $HARNESS; do
            dir=/tmp/ab_harness_${v}_${round}_${spec/:/_}
            rm -rf "$dir"
            in_variant "$v" 120 "$PY" -m deformops.bench.cli --out "$dir" --workload "${spec%%:*}" \
                --dtype "${spec#*:}" --name ab --impl deformops >/dev/null 2>&1
            "$PY" -c 'import json, sys
for r in json.load(open(sys.argv[1])):
    print(sys.argv[2], sys.argv[3], r["workload"], r["dtype"], "%.4f" % r["fwd_ms"], "%.4f" % r["fwdbwd_ms"])' \
                "$dir/ab.json" "$v" "$round" 2>/dev/null || echo "$v $round $spec: no result"
        done
    done
done | tee "$OUT/harness.txt"

record=${AB_RECORD:-}
if [[ $record == best ]]; then
    record=$(awk 'NF == 6 {t[$1] += $6} END {for (v in t) print t[v], v}' "$OUT/harness.txt" |
        sort -n | head -n 1 | awk '{print $2}')
    echo "=== least forward+backward time in the harness: ${record:-none (no harness times)}"
fi
if [[ -n $record ]]; then
    echo "=== $record: the MSDA benchmark with the peers ($SECONDS s)"
    mkdir -p "$OUT/record"
    in_variant "$record" 200 "$PY" -m deformops.bench.cli --out "$OUT/record" --peer-path "$PEERDIR" \
        --peer-timeout 120 --op msda --name msda \
        --impl deformops pytorch-grid-sample peer-deformops-3.0.1-cuda peer-deformops-3.0.1-triton 2>&1 |
        grep "| msda"
fi
echo "=== done ($SECONDS s)"
