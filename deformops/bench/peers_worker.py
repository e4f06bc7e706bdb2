"""Measures the published deformops 3.0.1 (the peer) in a process of its own.

The peer's top-level package is also named ``deformops`` (and registers ``torch.ops``
in the same namespace), so it cannot share a process with this package. This script is
run by file path, in isolated mode, by :mod:`deformops.bench.peers`::

    python -I peers_worker.py --peer-path DIR [--device cuda] [--warm]

It puts ``DIR`` (a ``pip install --no-deps --target DIR`` of the peer wheel) first on
``sys.path`` and imports only torch, the peer and the two torch-only harness modules
``workloads.py`` and ``timing.py`` (loaded by file path), so inputs and method are those
of the harness. Unless already set, it sets ``DEFORMOPS_COMPILE=1`` (the peer compiles its
CUDA library on first use), ``DEFORMOPS_DOWNLOAD=0`` and ``TORCH_EXTENSIONS_DIR=DIR/
_torch_extensions`` (the peer's build cache, shared by every worker of that folder).

Protocol: one JSON job per line on stdin, ``{op, impl, workload, dtype, seed, runs,
warmup, results_path}``; one JSON reply per line on the original stdout, ``{fwd_ms,
fwdbwd_ms, peak_mib, version, options}`` or ``{error}``. The output and gradients of
the first call, in the harness layout, are saved with ``torch.save`` to
``results_path``. Everything else the process prints (the peer's compiler output
included) goes to stderr.

``--warm`` builds the peer's CUDA library and compiles its Triton MSDA kernels on tiny
inputs, then exits; run it in the background early to take the build off the clock.
``--warm-conv PART PARTS`` compiles one part of the Triton convolution's autotuning
configs (minutes each on one core): ``PARTS`` processes side by side fill Triton's cache
(scripts/gpu_run.sh with PEER_CONV_PARTS), so that the benchmark's own autotuning only times them.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

PEER_VERSION = "3.0.1"
PEER_CUDA = f"peer-deformops-{PEER_VERSION}-cuda"
PEER_TRITON = f"peer-deformops-{PEER_VERSION}-triton"


def _load_sibling(name: str) -> ModuleType:
    """Import ``<this folder>/<name>.py`` by path, under a name outside ``deformops``."""
    module_name = f"_deformops_bench_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(
        module_name, Path(__file__).with_name(f"{name}.py")
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


workloads = _load_sibling("workloads")
timing = _load_sibling("timing")


def _fp32acc(dtype: torch.dtype, device: torch.device) -> bool:
    """The peer's own policy for Triton MSDA in training (its ``select_backend``):
    float32 accumulation for half types before SM 9.0."""
    if dtype not in (torch.float16, torch.bfloat16) or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) < (9, 0)


def _msda_case(
    registry: ModuleType, backend: str, workload: Any, inputs: dict[str, Tensor]
) -> tuple[Any, dict[str, Any]]:
    """The peer's MSDA on one backend, with attention weights in its flat layout
    ``[N, Q, M, L*P]``."""
    n, q, m, levels, points = inputs["attention_weights"].shape
    value = inputs["value"].detach().requires_grad_()
    loc = inputs["sampling_locations"].detach().requires_grad_()
    attn = inputs["attention_weights"].reshape(n, q, m, levels * points).detach().requires_grad_()
    tables = [inputs["spatial_shapes"], inputs["level_start_index"]]
    options: dict[str, Any] = {"backend": getattr(registry.Backend, backend.upper())}
    if backend == "triton":
        options["fp32acc"] = _fp32acc(value.dtype, value.device)

    def forward() -> Tensor:
        return registry.msda(value, *tables, loc, attn, **options)

    def canonical(out: Tensor, grads: tuple[Tensor, ...]) -> list[Tensor]:
        return [out, grads[0], grads[1], grads[2].view(n, q, m, levels, points)]

    case = timing.Case([value, loc, attn], forward, inputs["grad_output"], tables, canonical)
    return case, {k: v for k, v in options.items() if k != "backend"}


def _conv_case(
    registry: ModuleType, workload: Any, inputs: dict[str, Tensor]
) -> tuple[Any, dict[str, Any]]:
    """The peer's Triton deformable convolution, on its channels-last layout: input
    ``[N, H, W, C]``, offset ``[N, H_out, W_out, G, K, 2]``, mask ``[N, H_out, W_out, G, K]``,
    output ``[N, H_out, W_out, C_out]``."""
    n, _, h_out, w_out = inputs["grad_output"].shape
    g, k = workload.offset_groups, workload.kernel[0] * workload.kernel[1]
    views = {
        "input": inputs["input"].permute(0, 2, 3, 1),
        "offset": inputs["offset"].view(n, g, k, 2, h_out, w_out).permute(0, 4, 5, 1, 2, 3),
        "mask": inputs["mask"].view(n, g, k, h_out, w_out).permute(0, 3, 4, 1, 2)
        if workload.mask
        else None,
        "weight": inputs["weight"],
        "bias": inputs.get("bias"),
    }
    names = workloads.differentiable(workload)
    leaves = [views[name].detach().contiguous().requires_grad_() for name in names]
    args = dict(zip(names, leaves, strict=True))
    back = {
        "input": lambda t: t.permute(0, 3, 1, 2),
        "offset": lambda t: t.permute(0, 3, 4, 5, 1, 2).reshape(n, 2 * g * k, h_out, w_out),
        "mask": lambda t: t.permute(0, 3, 4, 1, 2).reshape(n, g * k, h_out, w_out),
        "weight": lambda t: t,
        "bias": lambda t: t,
    }

    def forward() -> Tensor:
        return registry.conv(
            args["input"],
            args["offset"],
            args["weight"],
            bias=args.get("bias"),
            mask=args.get("mask"),
            stride=workload.stride,
            padding=workload.padding,
            dilation=workload.dilation,
            offset_groups=g,
            backend=registry.Backend.TRITON,
        )

    def canonical(out: Tensor, grads: tuple[Tensor, ...]) -> list[Tensor]:
        return [
            out.permute(0, 3, 1, 2),
            *(back[name](t) for name, t in zip(names, grads, strict=True)),
        ]

    grad_output = inputs["grad_output"].permute(0, 2, 3, 1).contiguous()
    return timing.Case(leaves, forward, grad_output, canonical=canonical), {}


#: ``(op, impl) -> (peer registry, workload, inputs) -> (Case, options)``.
ADAPTERS: dict[tuple[str, str], Callable[..., tuple[Any, dict[str, Any]]]] = {
    ("msda", PEER_CUDA): lambda reg, w, x: _msda_case(reg, "cuda", w, x),
    ("msda", PEER_TRITON): lambda reg, w, x: _msda_case(reg, "triton", w, x),
    ("conv", PEER_TRITON): _conv_case,
}


def _import_peer(peer_path: str) -> ModuleType:
    """Import the peer from ``peer_path`` (first on ``sys.path``) and check where it came from."""
    os.environ.setdefault("DEFORMOPS_COMPILE", "1")
    os.environ.setdefault("DEFORMOPS_DOWNLOAD", "0")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(peer_path, "_torch_extensions"))
    sys.path.insert(0, peer_path)
    peer = importlib.import_module("deformops")
    origin = os.path.realpath(peer.__file__ or "")
    if not origin.startswith(os.path.realpath(peer_path) + os.sep):
        raise ImportError(f"'deformops' was imported from {origin}, not from {peer_path}")
    return peer


def run_job(peer: ModuleType, job: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Measure one ``(op, impl, workload, dtype)`` and save its results; the reply."""
    registry = importlib.import_module("deformops.registry")
    workload = workloads.from_dict(job["workload"])
    inputs = workloads.make_inputs(workload, workloads.DTYPES[job["dtype"]], device, job["seed"])
    case, options = ADAPTERS[(job["op"], job["impl"])](registry, workload, inputs)
    measured = timing.measure(case, job["runs"], job["warmup"])
    torch.save([t.cpu() for t in measured.results], job["results_path"])
    return {
        "fwd_ms": measured.fwd_ms,
        "fwdbwd_ms": measured.fwdbwd_ms,
        "peak_mib": measured.peak_mib,
        "extra_mib": measured.extra_mib,
        "version": peer.__version__,
        "options": options,
        "checksum": workloads.checksum(inputs),
    }


def serve(peer: ModuleType, device: torch.device, protocol: Any) -> None:
    """Answer jobs from stdin until it closes."""
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            reply = run_job(peer, json.loads(line), device)
        except Exception as error:
            traceback.print_exc()
            reply = {"error": f"{type(error).__name__}: {error}"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        protocol.write(json.dumps(reply) + "\n")
        protocol.flush()


def _warm_call(
    label: str,
    adapter: Callable[..., tuple[Any, dict[str, Any]]],
    registry: ModuleType,
    workload: Any,
    inputs: dict[str, Tensor],
) -> None:
    """Build the adapter's case and call it once (compiling or autotuning what it
    needs); print ``label: seconds, outcome`` on stderr."""
    start = time.perf_counter()
    try:
        case, _ = adapter(registry, workload, inputs)
        timing.measure(case, runs=1, warmup=0)
        outcome = "ok"
    except Exception as error:
        outcome = f"{type(error).__name__}: {error}"
    print(f"{label}: {time.perf_counter() - start:.1f} s, {outcome}", file=sys.stderr)


def warm(peer: ModuleType, device: torch.device) -> None:
    """Build the peer's CUDA MSDA library and compile its Triton MSDA kernels."""
    registry = importlib.import_module("deformops.registry")
    start = time.perf_counter()
    registry.msda.load(registry.Backend.CUDA)
    print(f"peer CUDA MSDA library ready in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    for name in ("m2f_enc", "detr_enc"):
        workload = workloads.WORKLOADS[name].scaled(1 / 16)
        for dtype in ("fp32", "bf16", "fp16"):
            inputs = workloads.make_inputs(workload, workloads.DTYPES[dtype], device)
            for impl in (PEER_CUDA, PEER_TRITON):
                _warm_call(
                    f"warm {impl} {name} {dtype}",
                    ADAPTERS[("msda", impl)],
                    registry,
                    workload,
                    inputs,
                )


#: The peer's Triton convolution kernels, each an autotuner over a list of configs.
CONV_TUNERS = ("_conv_forward_kernel", "_conv_backward_kernel")


def restrict_tuners(kernels: Any, part: int, parts: int) -> dict[str, int]:
    """Keep, in each autotuner of CONV_TUNERS in ``kernels``, every ``parts``-th config from
    ``part`` on (the parts together hold each config once); the configs each keeps."""
    if not 0 <= part < parts:
        raise ValueError(f"part must be in [0, {parts}), got {part}")
    kept = {}
    for name in CONV_TUNERS:
        tuner = getattr(kernels, name)
        tuner.configs = tuner.configs[part::parts]
        kept[name] = len(tuner.configs)
    return kept


def warm_conv(device: torch.device, part: int, parts: int) -> None:
    """Compile part ``part`` of ``parts`` of the peer's Triton convolution configs.

    Each autotuner keeps its part of the configs (restrict_tuners), and the convolution
    runs forward and backward once per conv workload and dtype, at full size (Triton
    specialises kernels on their integer arguments' divisibility by 16): the configs of
    this part are compiled into Triton's on-disk cache (which the processes of the other
    parts share), so that a later process autotuning over all of them only times them.
    """
    registry = importlib.import_module("deformops.registry")
    kernels = importlib.import_module("deformops.backends.triton._kernels.conv_deform2d")
    kept = restrict_tuners(kernels, part, parts)
    print(f"part {part}/{parts}: configs kept {kept}", file=sys.stderr)
    for name in ("r50_dcn", "hires_dcn"):
        workload = workloads.WORKLOADS[name]
        for dtype in ("fp32", "bf16", "fp16"):
            inputs = workloads.make_inputs(workload, workloads.DTYPES[dtype], device)
            _warm_call(f"part {part}: conv {name} {dtype}", _conv_case, registry, workload, inputs)


def main(argv: list[str] | None = None) -> int:
    """Entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-path", required=True, help="folder holding the peer package")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--warm", action="store_true", help="build and compile, then exit")
    parser.add_argument(
        "--warm-conv",
        nargs=2,
        type=int,
        metavar=("PART", "PARTS"),
        help="compile part PART of PARTS of the Triton convolution's configs, then exit",
    )
    args = parser.parse_args(argv)
    # The replies keep the original stdout; fd 1 (print, compilers) goes to stderr.
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    device = torch.device(args.device)
    try:
        peer = _import_peer(os.path.abspath(args.peer_path))
    except Exception as error:
        traceback.print_exc()
        if not (args.warm or args.warm_conv):
            reply = {"error": f"cannot import the peer: {type(error).__name__}: {error}"}
            for _ in sys.stdin:
                protocol.write(json.dumps(reply) + "\n")
                protocol.flush()
        return 1
    if args.warm:
        warm(peer, device)
    elif args.warm_conv:
        warm_conv(device, *args.warm_conv)
    else:
        serve(peer, device, protocol)
    return 0


if __name__ == "__main__":
    sys.exit(main())
