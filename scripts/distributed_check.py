"""Data-parallel training with both modules under torchrun: DDP and FSDP2 against one process.

    torchrun --nproc-per-node=2 scripts/distributed_check.py --backend nccl --device cuda \
        --dtype float32 --steps 20 --out result.json
    torchrun --nproc-per-node=2 scripts/distributed_check.py --backend gloo --device cpu \
        --dtype float64 --steps 3 --out result.json

Every rank trains the same small model (``DeformConv2d`` then ``DeformAttn2d``) for
``--steps`` SGD steps on its share of every global batch, under ``DistributedDataParallel``
and under FSDP2's ``fully_shard``; rank 0 also trains one copy on the whole global batches
alone. With ``--device cuda`` rank r runs on ``cuda:r`` (the single-process copy on
``cuda:0``). Rank 0 writes ``--out``: for each wrapper and rank, the largest relative
difference of any parameter from the single-process run, and the step count. The JIT
build of the native library happens once for all ranks (file lock, shared cache): each
rank reports whether it built or loaded.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from deformops import _build
from deformops.nn import DeformAttn2d, DeformConv2d

GLOBAL_BATCH = 4
CHANNELS = 8
HEIGHT, WIDTH = 6, 5
LEARNING_RATE = 0.1


class TinyDetector(nn.Module):
    """A deformable convolution, then deformable attention from every pixel over two levels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = DeformConv2d(3, CHANNELS)
        self.attn = DeformAttn2d(CHANNELS, num_heads=2, num_levels=2, num_points=2)
        self.head = nn.Linear(CHANNELS, 1)
        ys, xs = torch.meshgrid(
            (torch.arange(HEIGHT, dtype=torch.float64) + 0.5) / HEIGHT,
            (torch.arange(WIDTH, dtype=torch.float64) + 0.5) / WIDTH,
            indexing="ij",
        )
        points = torch.stack([xs, ys], -1).reshape(1, HEIGHT * WIDTH, 1, 2)
        self.register_buffer("reference_points", points.expand(1, -1, 2, 2).contiguous())

    def forward(self, images: Tensor) -> Tensor:
        """``[N, 3, H, W]`` images to ``[N, H*W]`` scores."""
        features = F.relu(self.conv(images))
        maps = [features, F.avg_pool2d(features, 2, ceil_mode=True)]
        queries = features.flatten(2).transpose(1, 2)
        points = self.reference_points.expand(images.shape[0], -1, -1, -1)
        return self.head(self.attn(queries, points, maps)).squeeze(-1)


def make_model(dtype: torch.dtype, device: torch.device) -> TinyDetector:
    """The model, the same on every rank (offsets start away from zero, so that the
    sampling is fractional)."""
    torch.manual_seed(0)
    model = TinyDetector().to(device, dtype)
    with torch.no_grad():
        for layer in (model.conv.conv_offset, model.attn.attention_weights):
            layer.weight.normal_(0.0, 0.3)
    return model


def global_batches(steps: int, dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
    """``steps`` (images, targets) global batches, the same on every rank."""
    generator = torch.Generator().manual_seed(1)
    shape = (GLOBAL_BATCH, 3, HEIGHT, WIDTH)
    return [
        (
            torch.randn(shape, generator=generator, dtype=dtype),
            torch.randn(GLOBAL_BATCH, HEIGHT * WIDTH, generator=generator, dtype=dtype),
        )
        for _ in range(steps)
    ]


def train(
    model: nn.Module, batches: list, rank: int, world_size: int, device: torch.device
) -> None:
    """SGD on this rank's contiguous share of every global batch (mean-reduced loss)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    share = GLOBAL_BATCH // world_size
    for images, targets in batches:
        local = slice(rank * share, (rank + 1) * share)
        loss = F.mse_loss(model(images[local].to(device)), targets[local].to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def full_state(model: nn.Module) -> dict[str, Tensor]:
    """Parameters by name on the CPU, gathered from their shards where they are DTensors."""
    state = {}
    for name, parameter in model.named_parameters():
        full = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter
        state[name.removeprefix("module.")] = full.detach().cpu().clone()
    return state


def largest_difference(state: dict[str, Tensor], expected: dict[str, Tensor]) -> float:
    """Largest ``|x - y| / max(|y|, 1e-3)`` over every element of every parameter."""
    return max(
        ((state[k] - v).abs() / v.abs().clamp_min(1e-3)).max().item() for k, v in expected.items()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="nccl", choices=["nccl", "gloo"])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.device == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
    dtype = getattr(torch, args.dtype)
    dist.init_process_group(args.backend)
    try:
        from torch.distributed.fsdp import fully_shard

        # The first use of the native library on this device type: one rank builds, the
        # others wait on the cache's lock and load what it built.
        loaded = _build.load(device.type)
        batches = global_batches(args.steps, dtype)
        ddp = nn.parallel.DistributedDataParallel(
            make_model(dtype, device), device_ids=[rank] if device.type == "cuda" else None
        )
        train(ddp, batches, rank, world_size, device)
        sharded = make_model(dtype, device)
        for module in (sharded.conv, sharded.attn, sharded):
            fully_shard(module)
        train(sharded, batches, rank, world_size, device)
        states = {"ddp": full_state(ddp), "fsdp2": full_state(sharded)}
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, {"states": states, "loaded": loaded})
        if rank == 0:
            single = make_model(dtype, device)
            train(single, batches, 0, 1, device)
            expected = full_state(single)
            initial = full_state(make_model(dtype, device))
            report = {
                "steps": args.steps,
                "world_size": world_size,
                "backend": args.backend,
                "device": str(device),
                "dtype": args.dtype,
                "native_loaded": [g["loaded"] for g in gathered],
                "trained_changed_every_parameter": all(
                    not torch.equal(expected[k], v) for k, v in initial.items()
                ),
                "largest_difference": {
                    mode: [largest_difference(g["states"][mode], expected) for g in gathered]
                    for mode in ("ddp", "fsdp2")
                },
            }
            args.out.write_text(json.dumps(report, indent=1))
            print(json.dumps(report))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
