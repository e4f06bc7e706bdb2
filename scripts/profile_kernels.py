"""Per-kernel GPU time of deformops' forward+backward on the benchmark workloads.

A development tool for deciding what to optimise: it runs the harness's ``deformops`` case
of each workload under ``torch.profiler`` and prints, per CUDA kernel (and memset / copy),
the time per forward+backward and the share of the total.

    python scripts/profile_kernels.py r50_dcn:fp16 detr_enc:fp32 [--deterministic] [--host] [--runs 10]
        [--scale 0.0625] [--heads-to-batch]

``--scale`` shrinks the maps (WORKLOAD.scaled): at a small scale the kernels take
microseconds and ``--host``'s wall time per forward+backward is the host's cost alone.
``--heads-to-batch`` runs an MSDA workload with one head and N * M images (the same work
per (image, head) pair, but a pair's value rows contiguous instead of M * D elements apart):
against the workload itself, it shows what the rows' spacing costs the caches.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import time

import torch
from torch.profiler import ProfilerActivity, profile

from deformops.bench.impls import IMPLS
from deformops.bench.timing import _forward_backward
from deformops.bench.workloads import WORKLOADS, make_inputs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def host_table(case: object, runs: int) -> None:
    """Print the wall time per forward+backward and the host operators that take it."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(runs):
        _forward_backward(case)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / runs * 1000
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            _forward_backward(case)
        torch.cuda.synchronize()
    print(f"  wall {wall:.3f} ms per forward+backward (back to back); host operators, self time:")
    for row in sorted(prof.key_averages(), key=lambda r: -r.self_cpu_time_total)[:12]:
        print(
            f"  {row.self_cpu_time_total / 1000 / runs:8.3f} ms x{row.count // runs:<4d} {row.key[:90]}"
        )


def profile_case(
    name: str, dtype: torch.dtype, runs: int, host: bool, scale: float, heads_to_batch: bool
) -> None:
    """Print the kernel table of ``runs`` forward+backward passes of workload ``name`` with
    its maps scaled by ``scale``, its heads made images with ``heads_to_batch`` (MSDA only),
    and, with ``host``, where the host's time goes."""
    workload = WORKLOADS[name] if scale == 1 else WORKLOADS[name].scaled(scale)
    if heads_to_batch:
        if workload.op != "msda":
            raise SystemExit(f"--heads-to-batch: {name} is not an MSDA workload")
        workload = dataclasses.replace(workload, n=workload.n * workload.heads, heads=1)
    case = IMPLS[workload.op]["deformops"].build(workload, make_inputs(workload, dtype, "cuda"))
    for _ in range(3):
        _forward_backward(case)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            _forward_backward(case)
        torch.cuda.synchronize()
    totals: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time / 1000.0
            counts[event.name] += 1
    total = sum(totals.values())
    print(
        f"\n{name}{' (heads as images)' if heads_to_batch else ''} x{scale} {dtype} "
        f"deterministic={torch.are_deterministic_algorithms_enabled()}: "
        f"{total / runs:.3f} ms of GPU time per forward+backward"
    )
    for kernel, ms in sorted(totals.items(), key=lambda kv: -kv[1])[:14]:
        print(
            f"  {ms / runs:8.3f} ms {100 * ms / total:5.1f}% x{counts[kernel] // runs:<3d} "
            f"{kernel[:110]}"
        )
    if host:
        host_table(case, runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", help="WORKLOAD:DTYPE, e.g. r50_dcn:fp16")
    parser.add_argument("--deterministic", action="store_true")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--host", action="store_true", help="also the host's time per operator")
    parser.add_argument("--scale", type=float, default=1.0, help="map sides times this")
    parser.add_argument(
        "--heads-to-batch",
        action="store_true",
        help="MSDA: one head and N * M images (a pair's value rows contiguous)",
    )
    args = parser.parse_args()
    torch.use_deterministic_algorithms(args.deterministic)
    for spec in args.cases:
        name, dtype = spec.split(":")
        profile_case(name, DTYPES[dtype], args.runs, args.host, args.scale, args.heads_to_batch)


if __name__ == "__main__":
    main()
