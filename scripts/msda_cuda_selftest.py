"""Self-test and timing of the CUDA multi-scale deformable attention kernels, on a GPU host.

1. Loads the native CUDA library: ``deformops._build.load("cuda")`` (the CPU library that
   defines the schemas first); if that fails, or with ``--extra-cuda-cflags``, compiles
   ``csrc/bindings_cuda.cpp`` and ``csrc/cuda/*.cu`` alone with
   ``torch.utils.cpp_extension.load`` and defines the two schemas from Python.
2. Compares ``torch.ops.deformops_native.msda_forward`` / ``msda_backward`` with the
   autograd of ``deformops.reference.multi_scale_deformable_attention`` in float64 on the
   CPU, on random inputs with points outside the map: D in 1, 12, 32, 48, 64, 256, several
   L, P and M, values in float64, float32, float16 and bfloat16, locations and weights in
   the value's dtype or float32, both accumulations of the half-precision value gradient
   (``DEFORMOPS_MSDA_HALF_GRAD=direct`` and ``fp32``), a misaligned value (generic path)
   and levels that disagree with S (compared with the CPU kernel, which skips the same
   corners). Prints a table of relative errors ``|x - ref| / |ref|``.
3. Times the DESIGN.md MSDA workloads (m2f_enc, detr_enc, detr_dec) in fp32, bf16 and
   fp16 with ``deformops.bench.timing.measure`` (CUDA events, L2 flushed before each call,
   warm-up, median of ``--runs`` calls), forward and forward+backward, and peak memory,
   plus the error of each result against float64 (computed on the GPU).

Usage: ``python scripts/msda_cuda_selftest.py [--skip-bench] [--runs 50] [--extra-cuda-cflags
-DNAME=VALUE ...]``. Exits non-zero if an error exceeds its tolerance.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import deformops  # noqa: E402
from deformops import reference  # noqa: E402

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}
NAMES = {
    torch.float64: "fp64",
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
}
HALF_MODES = ("direct", "fp32")

# (N, levels (H_l, W_l), Q, M, D, P)
CASES = [
    (2, ((5, 7), (3, 2), (1, 1)), 9, 3, 1, 2),
    (1, ((6, 6), (3, 3)), 13, 2, 12, 4),
    (2, ((16, 12), (8, 6), (4, 3), (2, 2)), 33, 8, 32, 4),
    (2, ((9, 11),), 7, 4, 48, 3),
    (1, ((8, 8), (4, 4)), 17, 2, 64, 5),
    (2, ((4, 5), (2, 3)), 5, 1, 256, 2),
    (1, ((12, 10), (6, 5), (3, 3)), 40, 8, 16, 1),
    (3, ((7, 9), (4, 5)), 11, 2, 128, 8),
]

_SCHEMAS = (
    "msda_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
    "Tensor sampling_locations, Tensor attention_weights) -> Tensor",
    "msda_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
    "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) "
    "-> (Tensor, Tensor, Tensor)",
)
_library_defs: list[torch.library.Library] = []


def load_native(extra_cuda_cflags: list[str]) -> bool:
    """Make ``torch.ops.deformops_native`` available on CUDA.

    Returns
    -------
    bool
        Whether the CPU library (and so the CPU kernels) is loaded too.
    """
    if not extra_cuda_cflags:
        try:
            from deformops import _build

            if _build.load("cuda"):
                return True
            print(f"deformops._build failed: {_build.load_error('cuda')}")
        except (ImportError, RuntimeError) as exc:
            print(f"deformops._build unavailable: {exc}")
    from torch.utils.cpp_extension import load

    csrc = ROOT / "deformops" / "csrc"
    have_cpu = hasattr(torch.ops.deformops_native, "msda_forward")
    if not have_cpu:  # the CPU library did not load: define the schemas here
        library = torch.library.Library("deformops_native", "DEF")
        for schema in _SCHEMAS:
            library.define(schema)
        _library_defs.append(library)
    load(
        name="deformops_msda_selftest",
        sources=[
            str(csrc / "bindings_cuda.cpp"),
            *map(str, sorted((csrc / "cuda").glob("msda*.cu"))),
        ],
        extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=["-O3", "-std=c++17", "-lineinfo", *extra_cuda_cflags],
        extra_include_paths=[str(csrc)],
        build_directory=tempfile.mkdtemp(prefix="deformops-selftest-"),
        is_python_module=False,
        verbose=False,
    )
    return have_cpu


@contextlib.contextmanager
def half_grad(mode: str) -> Iterator[None]:
    """Set ``DEFORMOPS_MSDA_HALF_GRAD`` (read by the binding at every call) for a block."""
    previous = os.environ.get("DEFORMOPS_MSDA_HALF_GRAD")
    os.environ["DEFORMOPS_MSDA_HALF_GRAD"] = mode
    try:
        yield
    finally:
        if previous is None:
            del os.environ["DEFORMOPS_MSDA_HALF_GRAD"]
        else:
            os.environ["DEFORMOPS_MSDA_HALF_GRAD"] = previous


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """``|actual - expected| / |expected|`` (Frobenius norms, in float64 on the CPU)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(actual).all():
        return float("inf")
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def make_inputs(
    case: tuple, dtype: torch.dtype, loc_dtype: torch.dtype, weight_dtype: torch.dtype
) -> dict[str, Tensor]:
    """Random CUDA inputs of a case; locations reach 0.3 outside [0, 1] on every side."""
    n, levels, q, m, d, p = case
    shapes = torch.tensor(levels, dtype=torch.int64, device="cuda")
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    num_levels = len(levels)
    return {
        "value": torch.randn(n, int(sizes.sum()), m, d, device="cuda").to(dtype),
        "spatial_shapes": shapes,
        "level_start_index": starts,
        "sampling_locations": (torch.rand(n, q, m, num_levels, p, 2, device="cuda") * 1.6 - 0.3).to(
            loc_dtype
        ),
        "attention_weights": torch.rand(n, q, m, num_levels, p, device="cuda")
        .softmax(-1)
        .to(weight_dtype),
        "grad_output": torch.randn(n, q, m * d, device="cuda").to(dtype),
    }


def native(inputs: dict[str, Tensor]) -> list[Tensor]:
    """Output and the three gradients from the native operators."""
    ops = torch.ops.deformops_native
    args = [
        inputs[k]
        for k in (
            "value",
            "spatial_shapes",
            "level_start_index",
            "sampling_locations",
            "attention_weights",
        )
    ]
    out = ops.msda_forward(*args)
    grads = ops.msda_backward(inputs["grad_output"], *args)
    return [out, *grads]


def float64_reference(inputs: dict[str, Tensor], device: str = "cpu") -> list[Tensor]:
    """Output and gradients of the reference implementation in float64, by autograd."""
    leaves = [
        inputs[k].detach().to(device, torch.float64).requires_grad_()
        for k in ("value", "sampling_locations", "attention_weights")
    ]
    tables = [inputs[k].to(device) for k in ("spatial_shapes", "level_start_index")]
    out = reference.multi_scale_deformable_attention(leaves[0], *tables, *leaves[1:])
    grads = torch.autograd.grad(out, leaves, inputs["grad_output"].to(device, torch.float64))
    return [out.detach(), *grads]


def check_dtypes(results: list[Tensor], inputs: dict[str, Tensor]) -> bool:
    """Whether each result has the dtype, shape and device of what it belongs to."""
    like = [
        inputs["grad_output"],
        inputs["value"],
        inputs["sampling_locations"],
        inputs["attention_weights"],
    ]
    return all(
        r.dtype == t.dtype and r.shape == t.shape and r.device == t.device
        for r, t in zip(results, like, strict=True)
    )


def correctness(verbose: bool) -> bool:
    """Native vs float64 reference on every case, dtype and layout.

    Prints one row per failure (every row when ``verbose``) and the largest errors per
    value dtype and half-precision accumulation.
    """
    header = f"{'case':<28} {'value':>5} {'loc':>5} {'wgt':>5} {'half':>6} "
    header += f"{'output':>9} {'g_value':>9} {'g_loc':>9} {'g_wgt':>9}  ok"
    print(header)
    worst: dict[tuple[str, str], list[float]] = {}
    all_ok = True
    for case, dtype in itertools.product(CASES, TOLERANCE):
        extra = [torch.float32] if dtype != torch.float32 else []
        for loc_dtype, weight_dtype in itertools.product([dtype, *extra], repeat=2):
            torch.manual_seed(len(case[1]) * 1000 + case[4])
            inputs = make_inputs(case, dtype, loc_dtype, weight_dtype)
            expected = float64_reference(inputs)
            modes = HALF_MODES if dtype in (torch.float16, torch.bfloat16) else ("-",)
            for mode in modes:
                with half_grad(mode if mode != "-" else "auto"):
                    results = native(inputs)
                torch.cuda.synchronize()
                errors = [relative_error(r, e) for r, e in zip(results, expected, strict=True)]
                # Each result is as accurate as the coarser of its own dtype and the value's.
                limits = [max(TOLERANCE[dtype], TOLERANCE[r.dtype]) for r in results]
                ok = check_dtypes(results, inputs) and all(
                    e <= limit for e, limit in zip(errors, limits, strict=True)
                )
                all_ok &= ok
                key = (NAMES[dtype], mode)
                worst[key] = [
                    max(a, b) for a, b in zip(worst.get(key, errors), errors, strict=True)
                ]
                if verbose or not ok:
                    n, levels, q, m, d, p = case
                    label = f"N{n} L{len(levels)} Q{q} M{m} D{d} P{p}"
                    print(
                        f"{label:<28} {NAMES[dtype]:>5} {NAMES[loc_dtype]:>5} "
                        f"{NAMES[weight_dtype]:>5} {mode:>6} "
                        + " ".join(f"{e:9.2e}" for e in errors)
                        + ("  ok" if ok else "  FAIL")
                    )
    print("largest errors:")
    for (dtype_name, mode), errors in worst.items():
        print(f"  {dtype_name:>5} {mode:>6} " + " ".join(f"{e:9.2e}" for e in errors))
    return all_ok


def misaligned() -> bool:
    """A value one element off 16-byte alignment takes the generic path and is still right."""
    ok = True
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(7)
        inputs = make_inputs(CASES[2], dtype, dtype, dtype)
        value = inputs["value"]
        storage = torch.empty(value.numel() + 1, dtype=dtype, device="cuda")
        shifted = storage[1:].view(value.shape)
        shifted.copy_(value)
        inputs["value"] = shifted
        errors = [
            relative_error(r, e)
            for r, e in zip(native(inputs), float64_reference(inputs), strict=True)
        ]
        passed = max(errors) <= TOLERANCE[dtype]
        ok &= passed
        print(
            f"misaligned value ({NAMES[dtype]}): max error {max(errors):.2e}"
            f" {'ok' if passed else 'FAIL'}"
        )
    return ok


def inconsistent_levels(have_cpu: bool) -> bool:
    """Levels that overrun S or start before 0: no fault, finite results, and (with the CPU
    library) the same results as the CPU kernel."""
    torch.manual_seed(3)
    inputs = make_inputs(CASES[2], torch.float32, torch.float32, torch.float32)
    inputs["level_start_index"] = torch.tensor([-40, 500, 100000, 700], device="cuda")
    inputs["spatial_shapes"] = torch.tensor([[16, 12], [30, 30], [4, 3], [2, 2]], device="cuda")
    results = native(inputs)
    torch.cuda.synchronize()
    ok = all(torch.isfinite(r).all().item() for r in results)
    detail = ""
    if have_cpu:
        cpu = native({k: v.cpu() for k, v in inputs.items()})
        errors = [relative_error(r, c) for r, c in zip(results, cpu, strict=True)]
        ok &= max(errors) <= 1e-5
        detail = f", max error vs CPU kernel {max(errors):.2e}"
    print(f"inconsistent levels: finite={ok}{detail} {'ok' if ok else 'FAIL'}")
    return ok


def benchmark(runs: int) -> None:
    """Time the DESIGN.md MSDA workloads and report error vs float64 and peak memory."""
    from deformops.bench import timing, workloads

    class NativeMsda(torch.autograd.Function):
        @staticmethod
        def forward(ctx, value, shapes, starts, loc, weights):
            ctx.save_for_backward(value, shapes, starts, loc, weights)
            return torch.ops.deformops_native.msda_forward(value, shapes, starts, loc, weights)

        @staticmethod
        def backward(ctx, grad):
            value, shapes, starts, loc, weights = ctx.saved_tensors
            gv, gl, gw = torch.ops.deformops_native.msda_backward(
                grad.contiguous(), value, shapes, starts, loc, weights
            )
            return gv, None, None, gl, gw

    print(
        f"{'workload':<9} {'dtype':>5} {'half':>6} {'fwd ms':>8} {'fwd+bwd':>8} {'peak MiB':>9}"
        f" {'e_out':>8} {'e_gv':>8} {'e_gl':>8} {'e_gw':>8} {'min GB':>7} {'GB/s fwd':>8}"
    )
    for name in ("m2f_enc", "detr_enc", "detr_dec"):
        workload = workloads.WORKLOADS[name]
        for dtype_name in ("fp32", "bf16", "fp16"):
            dtype = workloads.DTYPES[dtype_name]
            inputs = workloads.make_inputs(workload, dtype, "cuda")
            expected = float64_reference(inputs, "cuda")
            fwd_bytes, _ = workloads.msda_min_bytes(inputs)
            modes = HALF_MODES if dtype_name != "fp32" else ("-",)
            for mode in modes:
                leaves = [
                    inputs[k].detach().requires_grad_()
                    for k in ("value", "sampling_locations", "attention_weights")
                ]
                tables = [inputs["spatial_shapes"], inputs["level_start_index"]]
                case = timing.Case(
                    leaves,
                    lambda leaves=leaves, tables=tables: NativeMsda.apply(
                        leaves[0], *tables, *leaves[1:]
                    ),
                    inputs["grad_output"],
                    tables,
                )
                with half_grad(mode if mode != "-" else "auto"):
                    result = timing.measure(case, runs=runs, warmup=10)
                errors = [
                    relative_error(r, e) for r, e in zip(result.results, expected, strict=True)
                ]
                print(
                    f"{name:<9} {dtype_name:>5} {mode:>6} {result.fwd_ms:8.3f} "
                    f"{result.fwdbwd_ms:8.3f} {result.peak_mib:9.1f} "
                    + " ".join(f"{e:8.1e}" for e in errors)
                    + f" {fwd_bytes / 1e9:7.3f} {fwd_bytes / result.fwd_ms / 1e6:8.0f}"
                )
            del expected
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-bench", action="store_true", help="correctness only")
    parser.add_argument("--skip-check", action="store_true", help="timing only")
    parser.add_argument("--verbose", action="store_true", help="print every comparison")
    parser.add_argument("--runs", type=int, default=50, help="timed calls per measurement")
    parser.add_argument("--extra-cuda-cflags", nargs="*", default=[], help="e.g. -DNAME=VALUE")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("msda_cuda_selftest: no CUDA device", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")
    have_cpu = load_native(args.extra_cuda_cflags)
    deformops.set_backend(None)
    ok = True
    if not args.skip_check:
        ok &= correctness(args.verbose)
        ok &= misaligned()
        ok &= inconsistent_levels(have_cpu)
        print("correctness:", "all ok" if ok else "FAILURES")
    if not args.skip_bench:
        benchmark(args.runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
