"""Data-parallel training with both modules on 2 CPU processes (gloo): DDP and FSDP2.

Two processes train the same small model (``DeformConv2d`` then ``DeformAttn2d``) for a
few steps, each on its half of every global batch, under ``DistributedDataParallel`` and
under FSDP2's ``fully_shard``; their parameters must then equal those of one process
trained on the whole global batches (float64, so only the order of the gradient sums
differs). Both wrappers run in one ``torch.multiprocessing.spawn`` to pay for starting the
processes once.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

from deformops.nn import DeformAttn2d, DeformConv2d

WORLD_SIZE = 2
STEPS = 3
GLOBAL_BATCH = 4
CHANNELS = 8
HEIGHT, WIDTH = 6, 5
LEARNING_RATE = 0.5
MODES = ("ddp", "fsdp2")

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with the gloo backend is not available in this build of torch",
)


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


def _model() -> TinyDetector:
    torch.manual_seed(0)
    model = TinyDetector().double()
    with torch.no_grad():  # offsets start away from zero, so the sampling is fractional
        for layer in (model.conv.conv_offset, model.attn.attention_weights):
            layer.weight.normal_(0.0, 0.3)
    return model


def _global_batches() -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(1)
    shape = (GLOBAL_BATCH, 3, HEIGHT, WIDTH)
    return [
        (
            torch.randn(shape, generator=generator, dtype=torch.float64),
            torch.randn(GLOBAL_BATCH, HEIGHT * WIDTH, generator=generator, dtype=torch.float64),
        )
        for _ in range(STEPS)
    ]


def _train(model: nn.Module, rank: int, world_size: int) -> None:
    """SGD on this rank's contiguous share of every global batch (mean-reduced loss)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    share = GLOBAL_BATCH // world_size
    for images, targets in _global_batches():
        local = slice(rank * share, (rank + 1) * share)
        loss = F.mse_loss(model(images[local]), targets[local])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _full_state(model: nn.Module) -> dict[str, Tensor]:
    """Parameters by name, gathered from their shards where they are DTensors."""
    state = {}
    for name, parameter in model.named_parameters():
        full = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter
        state[name.removeprefix("module.")] = full.detach().clone()
    return state


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        from torch.distributed.fsdp import fully_shard

        ddp = nn.parallel.DistributedDataParallel(_model())
        _train(ddp, rank, WORLD_SIZE)
        sharded = _model()
        fully_shard(sharded.conv)
        fully_shard(sharded.attn)
        fully_shard(sharded)
        _train(sharded, rank, WORLD_SIZE)
        states = {"ddp": _full_state(ddp), "fsdp2": _full_state(sharded)}
        torch.save(states, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_states(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Final parameters of each rank, per mode, after training in 2 processes."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as error:
        pytest.skip(f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard: {error}")
    out_dir = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def single_process_state() -> dict[str, Tensor]:
    model = _model()
    _train(model, rank=0, world_size=1)
    return _full_state(model)


def test_training_changes_every_parameter(single_process_state: dict[str, Tensor]) -> None:
    initial = _full_state(_model())
    assert single_process_state.keys() == initial.keys()
    unchanged = [
        name for name, value in single_process_state.items() if torch.equal(value, initial[name])
    ]
    assert not unchanged


@pytest.mark.parametrize("mode", MODES)
def test_matches_single_process(
    mode: str, distributed_states: list[dict], single_process_state: dict[str, Tensor]
) -> None:
    for rank, states in enumerate(distributed_states):
        state = states[mode]
        assert state.keys() == single_process_state.keys(), rank
        for name, expected in single_process_state.items():
            torch.testing.assert_close(
                state[name], expected, rtol=1e-10, atol=1e-12, msg=f"rank {rank}: {name}"
            )
