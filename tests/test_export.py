"""``torch.export`` of models with both modules, with a fixed and a dynamic batch.

Each program is exported, saved with ``torch.export.save`` and loaded with
``torch.export.load`` in a fresh Python process that imports deformops (which registers the
``torch.ops.deformops`` operators the program calls); the loaded program's outputs equal
the eager outputs of the same inputs, bit for bit.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from deformops.nn import DeformAttn2d, DeformConv2d

ROOT = Path(__file__).resolve().parents[1]
CHANNELS = 8
TRACE_BATCH = 3
DYNAMIC_BATCHES = (2, 5)

# Run in a fresh interpreter: load every program of the folder and run it on its inputs.
CHILD = """
import sys
from pathlib import Path

import torch

import deformops  # registers torch.ops.deformops

folder = Path(sys.argv[1])
for path in sorted(folder.glob("*.pt2")):
    program = torch.export.load(path).module()
    calls = torch.load(path.with_suffix(".inputs.pt"))
    with torch.no_grad():
        outputs = [program(*inputs) for inputs in calls]
    torch.save(outputs, path.with_suffix(".outputs.pt"))
"""


def _randomize(module: nn.Module) -> nn.Module:
    """Non-zero offset predictors, so that the sampling points are fractional."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "offset" in name or "attention_weights" in name:
                parameter.normal_(0.0, 0.3)
    return module.eval()


class _Both(nn.Module):
    """``DeformConv2d`` features, attended to from every pixel with ``DeformAttn2d``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = DeformConv2d(4, CHANNELS, offset_groups=2)
        self.attn = DeformAttn2d(CHANNELS, num_heads=2, num_levels=2, num_points=3)

    def forward(self, images: Tensor, reference_points: Tensor) -> Tensor:
        features = self.conv(images).relu()
        maps = [features, nn.functional.avg_pool2d(features, 2)]
        return self.attn(features.flatten(2).transpose(1, 2), reference_points, maps)


def _conv_inputs(n: int) -> tuple[object, ...]:
    return (torch.randn(n, 4, 9, 11),)


def _attn_inputs(n: int) -> tuple[object, ...]:
    """``(query, reference_points, maps)`` with odd map sizes."""
    maps = [torch.randn(n, CHANNELS, h, w) for h, w in ((9, 7), (5, 4), (3, 2))]
    return torch.randn(n, 13, CHANNELS), torch.rand(n, 13, 3, 2), maps


def _both_inputs(n: int) -> tuple[object, ...]:
    return torch.randn(n, 4, 8, 6), torch.rand(n, 48, 2, 2)


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int], tuple[object, ...]]]] = {
    "conv": (lambda: DeformConv2d(4, 6, (3, 2), stride=(2, 1), offset_groups=2), _conv_inputs),
    "attn": (lambda: DeformAttn2d(CHANNELS, num_heads=2, num_levels=3, num_points=2), _attn_inputs),
    "both": (_Both, _both_inputs),
}
CASES = [(model, dynamic) for model in MODELS for dynamic in (False, True)]


def _case_id(model: str, dynamic: bool) -> str:
    return f"{model}-{'dynamic' if dynamic else 'fixed'}"


def _batch_dims(inputs: tuple[object, ...], batch: torch.export.Dim) -> tuple[object, ...]:
    """``dynamic_shapes`` with dimension 0 of every tensor (and of every list item) dynamic."""
    return tuple([{0: batch}] * len(x) if isinstance(x, list) else {0: batch} for x in inputs)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[list, list, str]]:
    """Per case: eager outputs, outputs of the program loaded in a fresh process, its code."""
    folder = tmp_path_factory.mktemp("programs")
    expected: dict[str, tuple[list, str]] = {}
    for model, dynamic in CASES:
        case = _case_id(model, dynamic)
        torch.manual_seed(0)
        make_module, make_inputs = MODELS[model]
        module = _randomize(make_module())
        trace_inputs = make_inputs(TRACE_BATCH)
        shapes = _batch_dims(trace_inputs, torch.export.Dim("batch")) if dynamic else None
        program = torch.export.export(module, trace_inputs, dynamic_shapes=shapes)
        torch.export.save(program, folder / f"{case}.pt2")
        calls = [make_inputs(n) for n in DYNAMIC_BATCHES] if dynamic else [trace_inputs]
        torch.save(calls, folder / f"{case}.inputs.pt")
        with torch.no_grad():
            expected[case] = ([module(*inputs) for inputs in calls], program.graph_module.code)
    subprocess.run([sys.executable, "-c", CHILD, str(folder)], cwd=ROOT, check=True, timeout=300)
    return {
        case: (outputs, torch.load(folder / f"{case}.outputs.pt"), code)
        for case, (outputs, code) in expected.items()
    }


@pytest.mark.parametrize(("model", "dynamic"), CASES, ids=[_case_id(*case) for case in CASES])
def test_loaded_program_matches_eager(loaded: dict, model: str, dynamic: bool) -> None:
    expected, actual, code = loaded[_case_id(model, dynamic)]
    ops = {
        "conv": ["deformops.deform_conv2d"],
        "attn": ["deformops.multi_scale_deformable_attention"],
        "both": ["deformops.deform_conv2d", "deformops.multi_scale_deformable_attention"],
    }[model]
    for op in ops:  # the operators stay single nodes of the program
        assert code.count(f"torch.ops.{op}.default(") == 1, code
    assert len(actual) == len(expected) == (len(DYNAMIC_BATCHES) if dynamic else 1)
    for got, want in zip(actual, expected, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=0)
