"""Self-test and timing of the CUDA deformable convolution, on a machine with a GPU.

1. Builds and loads the native libraries (:func:`load_native`).
2. Compares the forward and every gradient of ``deformops_native::deform_conv2d_forward`` /
   ``_backward`` with :mod:`deformops.reference` in float64, on odd shapes (1x1 maps,
   non-square maps, kernels 1x1 and 3x5, stride 2, dilation 2, groups 3, offset groups 4,
   with and without mask and bias, contiguous and channels-last, channel counts that take
   every vector width, a misaligned input, several chunks), on a side stream and in a
   CUDA graph.
3. Times the DESIGN.md workloads r50_dcn and hires_dcn (forward, forward+backward, peak
   memory) against ``torchvision.ops.deform_conv2d`` and a dense ``conv2d`` of the same
   shape (cuDNN): CUDA events, median of ``--repeats`` runs.

Usage: ``python scripts/conv_cuda_selftest.py [--repeats 50] [--skip-bench] [--json PATH]``.
Exits non-zero when a comparison fails.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deformops import _build, reference  # noqa: E402

CSRC = ROOT / "deformops" / "csrc"
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}

# (N, C_in, C_out, H, W, (kh, kw), stride, padding, dilation, groups, offset_groups, mask, bias)
CASES = [
    (2, 4, 6, 5, 7, (3, 3), 1, 1, 1, 1, 1, True, True),
    (1, 6, 6, 1, 1, (1, 1), 1, 0, 1, 3, 2, False, False),
    (2, 12, 6, 9, 11, (3, 5), (2, 1), (1, 2), 2, 3, 4, True, False),
    (3, 24, 9, 6, 7, (3, 3), 1, 2, (2, 1), 3, 1, False, True),
    (2, 64, 32, 13, 10, (3, 3), 2, 1, 1, 1, 2, True, True),
    (1, 520, 16, 5, 4, (3, 3), 1, 1, 1, 1, 1, True, True),
    (2, 16, 8, 8, 8, (1, 1), 1, 0, 1, 1, 1, True, True),
]
# Columns past the CUDA columns budget (80 MiB) in every dtype (151 MB in half
# precision): several chunks.
MULTI_CHUNK_CASE = (16, 128, 32, 64, 64, (3, 3), 1, 1, 1, 1, 1, True, True)

# name: (N, C_in, C_out, H, W): 3x3, padding 1, one offset group, mask and bias.
WORKLOADS = {"r50_dcn": (8, 256, 256, 64, 64), "hires_dcn": (16, 64, 64, 128, 128)}


def load_native() -> None:
    """Build (or find in the cache) and load the native CPU and CUDA libraries."""
    for device_type in ("cpu", "cuda"):
        if not _build.load(device_type):
            raise RuntimeError(f"native {device_type} library: {_build.load_error(device_type)}")
    if not torch._C._dispatch_has_kernel_for_dispatch_key(
        "deformops_native::deform_conv2d_forward", "CUDA"
    ):
        raise RuntimeError("the native library has no CUDA kernel for deform_conv2d_forward")


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else v


def conv_case(case: tuple, dtype: torch.dtype, channels_last: bool, misaligned: bool = False):
    """``(tensors, params)``: tensors ``[input, offset, weight, mask, bias]`` (mask and bias
    may be None) on the GPU and the six ints of the native schema."""
    n, c_in, c_out, h, w, (kh, kw), stride, padding, dilation, groups, og, mask, bias = case
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    h_out = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    w_out = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    k = kh * kw

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, device="cuda", dtype=torch.float64).to(dtype)

    x = rand(n, c_in, h, w)
    if channels_last or misaligned:
        x = x.to(memory_format=torch.channels_last)
    if misaligned:  # channels-last with a storage offset of one element
        flat = torch.empty(x.numel() + 1, device="cuda", dtype=dtype)
        view = flat[1:].view(n, h, w, c_in)
        view.copy_(x.permute(0, 2, 3, 1))
        x = view.permute(0, 3, 1, 2)
    tensors = [
        x,
        2 * rand(n, 2 * og * k, h_out, w_out),
        rand(c_out, c_in // groups, kh, kw) / (c_in // groups * k) ** 0.5,
        torch.rand(n, og * k, h_out, w_out, device="cuda").to(dtype) if mask else None,
        rand(c_out) if bias else None,
    ]
    return tensors, (sh, sw, ph, pw, dh, dw)


def _relative_error(actual: Tensor, expected: Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def _native_forward_backward(tensors, params, grad_output):
    native = torch.ops.deformops_native
    x, offset, weight, mask, bias = tensors
    out = native.deform_conv2d_forward(x, offset, weight, mask, bias, *params)
    grads = native.deform_conv2d_backward(grad_output, x, offset, weight, mask, *params)
    return out, grads


def check_case(case: tuple, dtype: torch.dtype, channels_last: bool, misaligned: bool) -> list:
    """Errors (name, error, tolerance) of the native op against the float64 reference."""
    tensors, params = conv_case(case, dtype, channels_last, misaligned)
    mask = tensors[3]
    d = [None if t is None else t.double() for t in tensors]
    stride, padding, dilation = params[0:2], params[2:4], params[4:6]
    expected = reference.deform_conv2d(d[0], d[1], d[2], d[4], stride, padding, dilation, d[3])
    grad_output = torch.randn_like(expected).to(dtype)
    out, (gi, go, gw, gm) = _native_forward_backward(tensors, params, grad_output)
    expected_grads = reference.deform_conv2d_backward(
        grad_output.double(), d[0], d[1], d[2], d[3], stride, padding, dilation
    )
    layout = torch.channels_last if channels_last or misaligned else torch.contiguous_format
    assert out.dtype == dtype, "output dtype"
    assert out.is_contiguous(memory_format=layout), "output layout"
    assert gi.is_contiguous(memory_format=layout), "grad_input layout"
    assert gm.numel() == (0 if mask is None else mask.numel()), "grad_mask size"
    tol = TOLERANCE[dtype]
    errors = [("output", _relative_error(out, expected), tol)]
    names = ("input", "offset", "weight", "mask")
    for name, actual, ref in zip(names, (gi, go, gw, gm), expected_grads, strict=True):
        if ref is not None:
            assert actual.dtype == dtype, f"grad_{name} dtype"
            assert actual.shape == ref.shape, f"grad_{name} shape"
            errors.append((f"grad_{name}", _relative_error(actual, ref), tol))
    return errors


def check_stream_and_graph() -> list:
    """The op on a side stream and replayed from a CUDA graph equals the eager op."""
    tensors, params = conv_case(CASES[4], torch.float32, True)
    x, offset, weight, mask, bias = tensors
    out = torch.ops.deformops_native.deform_conv2d_forward(x, offset, weight, mask, bias, *params)
    grad_output = torch.randn_like(out)
    eager = _native_forward_backward(tensors, params, grad_output)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        side = _native_forward_backward(tensors, params, grad_output)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _native_forward_backward(tensors, params, grad_output)
    x.copy_(torch.randn_like(x))
    graph.replay()
    fresh = _native_forward_backward(tensors, params, grad_output)
    errors = []
    for label, actual, expected, tol in (
        ("stream", side, eager, 1e-6),
        ("graph", captured, fresh, 1e-6),
    ):
        for i, (a, b) in enumerate(
            zip([actual[0], *actual[1]], [expected[0], *expected[1]], strict=True)
        ):
            errors.append((f"{label}[{i}]", _relative_error(a, b), tol))
    return errors


def run_checks() -> bool:
    """Run every comparison, print the failures and the worst error per dtype."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    worst: dict[str, float] = {}
    ok = True
    runs = [(case, False) for case in CASES] + [(CASES[4], True), (MULTI_CHUNK_CASE, False)]
    for case, misaligned in runs:
        for dtype in TOLERANCE:
            for channels_last in (False, True):
                for name, error, tol in check_case(case, dtype, channels_last, misaligned):
                    worst[str(dtype)] = max(worst.get(str(dtype), 0.0), error)
                    if not error <= tol:
                        ok = False
                        print(
                            f"FAIL {case} {dtype} cl={channels_last} misaligned={misaligned}: "
                            f"{name} error {error:.3e} > {tol:.0e}"
                        )
    for name, error, tol in check_stream_and_graph():
        if not error <= tol:
            ok = False
            print(f"FAIL {name}: {error:.3e} > {tol:.0e}")
    print("worst relative error vs float64:", {k: f"{v:.2e}" for k, v in worst.items()})
    return ok


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _peak_mib(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def _implementations(shape: tuple, dtype: torch.dtype) -> dict[str, tuple[Callable, Callable]]:
    """name: (forward, forward+backward) closures over fresh random inputs."""
    import torchvision

    n, c_in, c_out, h, w = shape
    tensors, params = conv_case(
        (n, c_in, c_out, h, w, (3, 3), 1, 1, 1, 1, 1, True, True), dtype, False
    )
    x, offset, weight, mask, bias = tensors
    grad_output = torch.randn(n, c_out, h, w, device="cuda", dtype=dtype)
    native = torch.ops.deformops_native

    def ours_fwd():
        return native.deform_conv2d_forward(x, offset, weight, mask, bias, *params)

    def ours_fwd_bwd():
        ours_fwd()
        grads = native.deform_conv2d_backward(grad_output, x, offset, weight, mask, *params)
        return grads, grad_output.sum((0, 2, 3), dtype=torch.float32).to(dtype)

    leaves = [t.detach().requires_grad_() for t in tensors]

    def tv_fwd():
        with torch.no_grad():
            return torchvision.ops.deform_conv2d(
                x, offset, weight, bias, stride=1, padding=1, dilation=1, mask=mask
            )

    def tv_fwd_bwd():
        xl, ol, wl, ml, bl = leaves
        out = torchvision.ops.deform_conv2d(
            xl, ol, wl, bl, stride=1, padding=1, dilation=1, mask=ml
        )
        out.backward(grad_output)

    dense = [
        x.detach().requires_grad_(),
        weight.detach().requires_grad_(),
        bias.detach().requires_grad_(),
    ]

    def dense_fwd():
        with torch.no_grad():
            return F.conv2d(x, weight, bias, padding=1)

    def dense_fwd_bwd():
        F.conv2d(dense[0], dense[1], dense[2], padding=1).backward(grad_output)

    return {
        "deformops": (ours_fwd, ours_fwd_bwd),
        "torchvision": (tv_fwd, tv_fwd_bwd),
        "cudnn-dense": (dense_fwd, dense_fwd_bwd),
    }


def run_bench(repeats: int) -> list[dict]:
    """Time every workload, dtype and implementation; print a table."""
    rows = []
    settings = [
        (torch.float32, False),
        (torch.float32, True),
        (torch.float16, False),
        (torch.bfloat16, False),
    ]
    for name, shape in WORKLOADS.items():
        for dtype, tf32 in settings:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            for impl, (fwd, fwd_bwd) in _implementations(shape, dtype).items():
                if tf32 and impl != "deformops":
                    continue
                label = str(dtype).removeprefix("torch.") + ("+tf32" if tf32 else "")
                try:
                    times = (_median_ms(fwd, repeats), _median_ms(fwd_bwd, repeats))
                except RuntimeError as exc:  # torchvision has no bfloat16 kernel
                    print(f"{name:10s} {label:13s} {impl:12s} unavailable: {str(exc)[:60]}")
                    continue
                r = {
                    "workload": name,
                    "dtype": label,
                    "impl": impl,
                    "forward_ms": times[0],
                    "forward_backward_ms": times[1],
                    "peak_mib": _peak_mib(fwd_bwd),
                }
                rows.append(r)
                print(
                    f"{r['workload']:10s} {r['dtype']:13s} {r['impl']:12s} "
                    f"{r['forward_ms']:8.3f} {r['forward_backward_ms']:8.3f} {r['peak_mib']:8.0f}"
                )
    torch.backends.cuda.matmul.allow_tf32 = False
    return rows


def run_profile() -> None:
    """Print the CUDA kernels of one forward+backward of each workload (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    for name, shape in WORKLOADS.items():
        for dtype in (torch.float16, torch.float32):
            _, fwd_bwd = _implementations(shape, dtype)["deformops"]
            fwd_bwd()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    fwd_bwd()
                torch.cuda.synchronize()
            print(f"--- {name} {dtype}: CUDA time of 5 forward+backward")
            print(
                prof.key_averages().table(
                    sort_by="cuda_time_total", row_limit=12, max_name_column_width=70
                )
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print a per-kernel breakdown")
    parser.add_argument("--json", type=Path, help="write the timings here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("conv_cuda_selftest: no CUDA device", file=sys.stderr)
        return 2
    load_native()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    ok = True if args.skip_checks else run_checks()
    if args.profile:
        run_profile()
    if not args.skip_bench:
        print(
            f"{'workload':10s} {'dtype':13s} {'impl':12s} {'fwd ms':>8s} {'f+b ms':>8s} {'peak MiB':>8s}"
        )
        rows = run_bench(args.repeats)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
