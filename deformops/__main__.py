"""Command line of deformops: python -m deformops {info,check,build,bench}.

- ``info``: versions, devices, the requested backend and the native library's cache state.
- ``check``: both modules forward and backward on every available device and backend,
  compared with the float64 reference; prints a table, exits 1 on any mismatch.
- ``build``: compile the native library ahead of time (for Docker images) and print where.
- ``bench``: the benchmark workloads, for this package and its peers (see
  :mod:`deformops.bench`).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence

import torch

from . import __version__, _build, ops
from .bench import cli as bench_cli
from .nn import DeformAttn2d, DeformConv2d, DeformRoIPoolPack2d

#: Largest relative error (norm) of float32 results against the float64 reference.
CHECK_TOLERANCE = 1e-4


def _devices() -> list[str]:
    return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def info() -> int:
    """Print versions, devices, the backend setting and the cache state."""
    print(f"deformops {__version__}")
    print(f"torch     {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    print(f"python    {platform.python_version()} on {platform.platform()}")
    for device in _devices():
        name = platform.processor() or platform.machine()
        if device.startswith("cuda"):
            props = torch.cuda.get_device_properties(device)
            name = f"{props.name}, sm_{props.major}{props.minor}, {props.total_memory >> 20} MiB"
        print(f"device    {device}: {name}")
    print(
        f"backend   DEFORMOPS_BACKEND={os.environ.get('DEFORMOPS_BACKEND', '') or '(unset: auto)'}"
    )
    state = _build.cache_info()
    print(f"cache     {state['cache_dir']}")
    for entry in state["entries"]:
        print(f"  entry   {entry['device_type']}: {entry['path']} ({entry['size'] >> 10} KiB)")
    if not state["entries"]:
        print("  (empty: the native library is compiled on the first call of an operator)")
    for device_type, status in state["loaded"].items():
        print(f"loaded    {device_type}: {status}")
    return 0


def _conv_case(device: str) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    layer = DeformConv2d(8, 12, kernel_size=3, offset_groups=2)
    torch.nn.init.normal_(layer.conv_offset.weight, std=0.3)
    return layer, [torch.randn(2, 8, 11, 9, device=device)]


def _attn_case(device: str) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    layer = DeformAttn2d(embed_dim=48, num_heads=4, num_levels=2, num_points=3)
    torch.nn.init.normal_(layer.sampling_offsets.weight, std=0.3)
    torch.nn.init.normal_(layer.attention_weights.weight, std=0.3)
    maps = [torch.randn(2, 48, 9, 13, device=device), torch.randn(2, 48, 5, 7, device=device)]
    query = torch.randn(2, 17, 48, device=device)
    reference_points = torch.rand(2, 17, 2, 2, device=device)
    return layer, [query, reference_points, *maps]


def _roi_case(device: str) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    layer = DeformRoIPoolPack2d(3, output_channels=8, deform_fc_channels=16, spatial_scale=0.5)
    torch.nn.init.normal_(layer.offset_fc[-1].weight, std=0.3)  # offsets that matter
    corners = torch.rand(6, 2, device=device) * 12
    sizes = 2 + torch.rand(6, 2, device=device) * 10
    batch = torch.tensor([0, 1, 1, 0, 1, 0], dtype=torch.float32, device=device)
    rois = torch.cat([batch[:, None], corners, corners + sizes], dim=1)
    return layer, [torch.randn(2, 8, 12, 10, device=device), rois]


def _attn_call(layer: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    return layer(inputs[0], inputs[1], list(inputs[2:]))


_CASES: dict[str, tuple[str, Callable, Callable]] = {
    "DeformConv2d": ("deform_conv2d", _conv_case, lambda layer, inputs: layer(*inputs)),
    "DeformAttn2d": ("multi_scale_deformable_attention", _attn_case, _attn_call),
    "DeformRoIPoolPack2d": ("deform_roi_pool", _roi_case, lambda layer, inputs: layer(*inputs)),
}


def _run(layer, call, inputs) -> tuple[list[torch.Tensor], float]:
    """Forward and backward; the output and every gradient, and the seconds taken."""
    inputs = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    layer.zero_grad()
    start = time.perf_counter()
    out = call(layer, inputs)
    out.backward(torch.ones_like(out))
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
    seconds = time.perf_counter() - start
    results = [out] + [t.grad for t in inputs if t.grad is not None]
    return [r.detach().double().cpu() for r in results] + [
        p.grad.detach().double().cpu() for p in layer.parameters()
    ], seconds


def _relative_error(results: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> float:
    return max(
        ((r - e).norm() / e.norm().clamp_min(1e-30)).item()
        for r, e in zip(results, expected, strict=True)
    )


def check() -> int:
    """Run the modules of the three operators on every device and backend against the
    float64 reference."""
    rows = []
    failed = False
    for name, (op, make, call) in _CASES.items():
        torch.manual_seed(0)
        layer, inputs = make("cpu")
        ops.set_backend("reference")
        expected, _ = _run(layer.double(), call, [t.double() for t in inputs])
        for device in _devices():
            for backend in ("reference", "native"):
                ops.set_backend(backend)
                try:
                    ops.backend(device, op)
                except RuntimeError as error:
                    rows.append((name, device, backend, "-", "-", f"unavailable: {error}"))
                    continue
                results, seconds = _run(
                    layer.to(device, torch.float32), call, [t.to(device) for t in inputs]
                )
                error = _relative_error(results, expected)
                ok = error <= CHECK_TOLERANCE
                failed |= not ok
                rows.append(
                    (
                        name,
                        device,
                        backend,
                        f"{error:.2e}",
                        f"{seconds * 1e3:.1f}",
                        "ok" if ok else "MISMATCH",
                    )
                )
    ops.set_backend(None)
    header = ("module", "device", "backend", "rel. error", "ms (fwd+bwd)", "status")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    print(
        f"float32 vs float64 reference, tolerance {CHECK_TOLERANCE:g}: {'FAILED' if failed else 'all ok'}"
    )
    return 1 if failed else 0


def build(device: str, arch: list[str] | None) -> int:
    """Compile the native library for ``device`` and print its path."""
    path = _build.build(device, arch_list=arch)
    print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m deformops`` and of the ``deformops`` command."""
    parser = argparse.ArgumentParser(
        prog="python -m deformops", description=__doc__.splitlines()[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, devices, backend and native library cache state")
    commands.add_parser("check", help="compare every device and backend with the reference")
    build_parser = commands.add_parser("build", help="compile the native library ahead of time")
    build_parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    build_parser.add_argument(
        "--arch", nargs="+", help="CUDA architectures, e.g. 8.0 9.0 (default: the GPUs present)"
    )
    bench_parser = commands.add_parser("bench", help="benchmark the operators and their peers")
    bench_cli.add_arguments(bench_parser)
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench_cli.run(args)
    if args.command == "info":
        return info()
    if args.command == "check":
        return check()
    return build(args.device, args.arch)


if __name__ == "__main__":
    sys.exit(main())
