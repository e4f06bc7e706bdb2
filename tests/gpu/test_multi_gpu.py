"""Several GPUs of one host (issue 10): NCCL data parallel training, device placement and
streams, one JIT build for all ranks. Skipped with fewer than two CUDA devices;
``scripts/multi_gpu_run.sh`` runs this file and the per-GPU benchmarks in one call."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed_runner import run_distributed_check

import deformops

pytestmark = pytest.mark.skipif(
    torch.cuda.device_count() < 2 or not dist.is_available() or not dist.is_nccl_available(),
    reason="needs two CUDA devices and NCCL (scripts/multi_gpu_run.sh on a multi-GPU host)",
)


def test_nccl_ddp_and_fsdp2_match_one_gpu(tmp_path: Path) -> None:
    """20 steps on 2 GPUs under DDP and FSDP2 equal one GPU's run within float32 rounding;
    the native library is built once for both ranks (empty shared cache, file lock)."""
    env = dict(os.environ, DEFORMOPS_CACHE_DIR=str(tmp_path / "cache"))
    options = ("--backend", "nccl", "--device", "cuda", "--dtype", "float32", "--steps", "20")
    report, output = run_distributed_check(tmp_path, *options, timeout=900, env=env)
    print(report)
    assert report["trained_changed_every_parameter"]
    assert report["native_loaded"] == [True, True]
    assert output.count("compiling the native CUDA library") == 1, output[-3000:]
    for mode in ("ddp", "fsdp2"):
        assert max(report["largest_difference"][mode]) <= 1e-4, (mode, report)


def _inputs(device: torch.device) -> list[torch.Tensor]:
    """Fixed random inputs of both ops on ``device`` (the float ones require grad)."""
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=generator).to(device).requires_grad_()

    shapes = torch.tensor([[6, 8], [3, 4]], device=device)
    starts = torch.tensor([0, 48], device=device)
    return [
        rand(2, 4, 7, 9),  # input
        rand(2, 18, 7, 9),  # offset (x2 - 1 below)
        rand(6, 4, 3, 3),  # weight
        rand(2, 60, 2, 8),  # value
        rand(2, 5, 2, 2, 3, 2),  # sampling locations
        rand(2, 5, 2, 2, 3),  # attention weights
        shapes,
        starts,
    ]


def _run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Outputs of both ops and the gradients of the float inputs."""
    x, offset, weight, value, loc, attn, shapes, starts = inputs
    conv = deformops.deform_conv2d(x, offset * 2 - 1, weight, padding=1)
    msda = deformops.multi_scale_deformable_attention(value, shapes, starts, loc, attn)
    grads = torch.autograd.grad(conv.square().sum() + msda.square().sum(), inputs[:6])
    return [conv.detach(), msda.detach(), *grads]


def test_ops_follow_their_inputs_device_while_another_is_current() -> None:
    """Inputs on cuda:1 with cuda:0 current: correct results (device guard)."""
    expected = _run(_inputs(torch.device("cpu")))
    inputs = _inputs(torch.device("cuda", 1))
    with torch.cuda.device(0):
        results = _run(inputs)
    for r, e in zip(results, expected, strict=True):
        assert r.device == torch.device("cuda", 1)
        torch.testing.assert_close(r.cpu(), e, rtol=1e-4, atol=1e-5)


def test_ops_launch_on_the_current_stream_of_their_device() -> None:
    """Captured into a CUDA graph on a side stream of cuda:1: a launch on any other stream
    (cuda:0's, or cuda:1's default) would break the capture; the replay gives the eager
    result."""
    device = torch.device("cuda", 1)
    inputs = _inputs(device)
    eager = _run(inputs)
    stream = torch.cuda.Stream(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.device(1):
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            _run(inputs)  # warm-up on the side stream
            with torch.cuda.graph(graph, stream=stream):
                captured = _run(inputs)
    graph.replay()
    torch.cuda.synchronize(device)
    for r, e in zip(captured, eager, strict=True):
        torch.testing.assert_close(r, e)
