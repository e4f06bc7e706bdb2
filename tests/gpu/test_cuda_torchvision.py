"""``deformops.integrations.torchvision``: a model of ``torchvision.ops.DeformConv2d`` layers
gives the same outputs and gradients before and after ``patch()``, on CUDA and on the CPU,
runs on deformops after it, and ``unpatch()`` restores torchvision exactly.

Here and not in ``tests/`` because torchvision cannot be imported in CI (its operators do
not load with the CPU build of torch); the GPU host has it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import count_calls
from torch import Tensor, nn

import deformops
from deformops.integrations import torchvision as tv_integration

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device: GPU tests run on the GPU host (scripts/gpu_run.sh)",
)


@pytest.fixture(scope="module")
def torchvision() -> Any:
    return pytest.importorskip("torchvision")


@pytest.fixture(autouse=True)
def _strict_float32_unpatched() -> Iterator[None]:
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    tv_integration.unpatch()
    yield
    tv_integration.unpatch()
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.fixture
def conv_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the calls of the deformops operator (one entry per call)."""
    return count_calls(monkeypatch, "deform_conv2d")


class DeformNet(nn.Module):
    """Two ``torchvision.ops.DeformConv2d`` layers fed by their own offset predictors, as in
    a detection backbone: DCN v2 (mask, 2 offset groups, bias), then DCN v1 (strided,
    dilated, grouped, 4 offset groups, no bias). The predictors start random, so that the
    samples fall between pixels (not on the kinks of bilinear sampling)."""

    def __init__(self, ops: Any) -> None:
        super().__init__()
        self.predict1 = nn.Conv2d(8, 3 * 2 * 9, 3, padding=1)  # 2 groups: offsets, mask
        self.dcn1 = ops.DeformConv2d(8, 16, 3, padding=1)
        self.predict2 = nn.Conv2d(16, 2 * 4 * 9, 3, stride=2, padding=2, dilation=2)
        self.dcn2 = ops.DeformConv2d(
            16, 12, 3, stride=2, padding=2, dilation=2, groups=4, bias=False
        )
        for predictor in (self.predict1, self.predict2):
            nn.init.normal_(predictor.weight, std=0.3)
            nn.init.normal_(predictor.bias, std=1.0)

    def forward(self, x: Tensor) -> Tensor:
        offset, mask = self.predict1(x).split([2 * 2 * 9, 2 * 9], dim=1)
        y = torch.relu(self.dcn1(x, offset, mask.sigmoid()))
        return self.dcn2(y, self.predict2(y))


def _forward_backward(model: nn.Module, x: Tensor) -> list[Tensor]:
    """The output and the gradients of the input and of every parameter, for a fixed
    random output gradient."""
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = model(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out))
    return [out.detach(), x.grad, *(p.grad for p in model.parameters())]


def _relative_error(actual: Tensor, expected: Tensor) -> float:
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_model_same_outputs_and_gradients(
    torchvision: Any, device: str, conv_calls: list[int]
) -> None:
    """float64: equal to 1e-10. float32: as close to torchvision's float64 results as
    torchvision's float32 ones are (two float32 implementations each differ from float64 by
    rounding, not from each other by less)."""
    torch.manual_seed(0)
    model64 = DeformNet(torchvision.ops).to(device, torch.float64)
    model32 = copy.deepcopy(model64).float()
    x = torch.randn(2, 8, 13, 17, device=device, dtype=torch.float64)
    before64, before32 = _forward_backward(model64, x), _forward_backward(model32, x.float())
    assert not conv_calls, "the unpatched model called deformops"
    tv_integration.patch()
    after64, after32 = _forward_backward(model64, x), _forward_backward(model32, x.float())
    assert len(conv_calls) == 4
    names = ["output", "input", *(name for name, _ in model64.named_parameters())]
    for name, b64, a64, b32, a32 in zip(names, before64, after64, before32, after32, strict=True):
        assert a64.shape == b64.shape, name
        assert b64.norm() > 0, name
        assert _relative_error(a64, b64) <= 1e-10, name
        assert _relative_error(a32, b64) <= 2 * _relative_error(b32, b64) + 1e-6, name


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_function_same_results(torchvision: Any, device: str, conv_calls: list[int]) -> None:
    """``torchvision.ops.deform_conv2d``, called through the package as user code does."""
    generator = torch.Generator().manual_seed(2)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device)

    args = (rand(2, 6, 9, 11), 2 * rand(2, 2 * 3 * 9, 9, 11), rand(4, 6, 3, 3), rand(4))
    mask = rand(2, 3 * 9, 9, 11).sigmoid()
    expected = torchvision.ops.deform_conv2d(*args, padding=(1, 1), mask=mask)
    tv_integration.patch()
    out = torchvision.ops.deform_conv2d(*args, padding=(1, 1), mask=mask)
    assert len(conv_calls) == 1
    assert _relative_error(out, expected) <= 1e-12


def test_patch_is_idempotent_and_unpatch_restores_exactly(torchvision: Any) -> None:
    from torchvision.ops import deform_conv

    def hooks() -> list[object]:
        return [
            vars(torchvision.ops)["deform_conv2d"],
            vars(deform_conv)["deform_conv2d"],
            vars(deform_conv.DeformConv2d)["forward"],
        ]

    originals = hooks()
    tv_integration.patch()
    patched = hooks()
    assert patched[0] is patched[1] is deformops.deform_conv2d
    assert patched[2] is not originals[2]
    tv_integration.patch()
    assert hooks() == patched
    assert tv_integration.is_patched()
    tv_integration.unpatch()
    assert all(a is b for a, b in zip(hooks(), originals, strict=True))
    assert not tv_integration.is_patched()
    tv_integration.unpatch()
    assert all(a is b for a, b in zip(hooks(), originals, strict=True))
