"""Per-kernel GPU time of deformops' forward+backward on the benchmark workloads.

A development tool for deciding what to optimise: it runs the harness's ``deformops`` case
of each workload under ``torch.profiler`` and prints, per CUDA kernel (and memset / copy),
the time per forward+backward and the share of the total.

    python scripts/profile_kernels.py r50_dcn:fp16 detr_enc:fp32 [--deterministic] [--runs 10]
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

from deformops.bench.impls import IMPLS
from deformops.bench.timing import _forward_backward
from deformops.bench.workloads import WORKLOADS, make_inputs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def profile_case(name: str, dtype: torch.dtype, runs: int) -> None:
    """Print the kernel table of ``runs`` forward+backward passes of workload ``name``."""
    workload = WORKLOADS[name]
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
        f"\n{name} {dtype} deterministic={torch.are_deterministic_algorithms_enabled()}: "
        f"{total / runs:.3f} ms of GPU time per forward+backward"
    )
    for kernel, ms in sorted(totals.items(), key=lambda kv: -kv[1])[:14]:
        print(
            f"  {ms / runs:8.3f} ms {100 * ms / total:5.1f}% x{counts[kernel] // runs:<3d} "
            f"{kernel[:110]}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", help="WORKLOAD:DTYPE, e.g. r50_dcn:fp16")
    parser.add_argument("--deterministic", action="store_true")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    torch.use_deterministic_algorithms(args.deterministic)
    for spec in args.cases:
        name, dtype = spec.split(":")
        profile_case(name, DTYPES[dtype], args.runs)


if __name__ == "__main__":
    main()
