"""Data-parallel training with both modules on 2 CPU processes (gloo): DDP and FSDP2.

``scripts/distributed_check.py`` runs under ``torchrun --nproc-per-node=2``: two processes
train the same small model (``DeformConv2d`` then ``DeformAttn2d``) for a few steps, each on
its half of every global batch, under ``DistributedDataParallel`` and under FSDP2's
``fully_shard``; their parameters must then equal those of one process trained on the
whole global batches (float64, so only the order of the gradient sums differs). The same
script runs with NCCL on two GPUs in ``tests/gpu/test_multi_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist
from distributed_runner import run_distributed_check

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with the gloo backend is not available in this build of torch",
)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    options = ("--backend", "gloo", "--device", "cpu", "--dtype", "float64", "--steps", "3")
    return run_distributed_check(tmp_path_factory.mktemp("distributed"), *options)[0]


def test_training_changes_every_parameter(report: dict) -> None:
    assert report["trained_changed_every_parameter"]
    assert report["world_size"] == 2


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_matches_single_process(mode: str, report: dict) -> None:
    differences = report["largest_difference"][mode]
    assert len(differences) == 2
    assert max(differences) <= 1e-10, differences
