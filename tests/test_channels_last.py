"""channels_last models: the native convolution makes no layout copy (CPU, profiler).

A ``DeformConv2d`` converted with ``model.to(memory_format=torch.channels_last)`` feeds
the operator a channels-last input and weight, offsets that are a channel slice of the
channels-last offset predictor's output and a channels-last mask. The native kernels read
all of them through their strides and write every gradient in its input's layout, so the
only copy left inside the operator is the bias broadcast into the GEMM's output. The CUDA
version of the profile is in ``tests/gpu/test_cuda_training.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from conftest import make_conv_inputs
from naive import relative_error
from torch import Tensor
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile

import deformops
from deformops.nn import DeformConv2d

CL = torch.channels_last
F64 = torch.float64
# Copies that change a tensor's layout: a copy of a 4-d tensor, or a contiguous() that
# copies (clone); the GEMMs' 2-d bias broadcast is not one.
LAYOUT_COPIES = ("aten::copy_", "aten::contiguous", "aten::clone")


@pytest.fixture
def native() -> Iterator[None]:
    deformops.set_backend("native")
    yield
    deformops.set_backend(None)


def descendants(event: FunctionEvent) -> Iterator[FunctionEvent]:
    for child in event.cpu_children:
        yield child
        yield from descendants(child)


def layout_copies(model: DeformConv2d, x: Tensor, grad: Tensor) -> dict[str, list[str]]:
    """Per native operator, the layout copies made inside it during forward + backward."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        model(x).backward(grad)
    copies: dict[str, list[str]] = {}
    for event in prof.events():
        if event.name.startswith("deformops_native::"):
            inner = copies.setdefault(event.name.split("::")[1], [])
            for e in descendants(event):
                shapes = e.input_shapes or [[]]
                if e.name in LAYOUT_COPIES and (e.name != "aten::copy_" or len(shapes[0]) == 4):
                    inner.append(f"{e.name}{shapes[0]}")
    return copies


def model_of(memory_format: torch.memory_format) -> DeformConv2d:
    torch.manual_seed(0)
    model = DeformConv2d(8, 12, offset_groups=2)
    torch.nn.init.normal_(model.conv_offset.weight, std=0.3)
    return model.to(memory_format=memory_format)


@pytest.mark.usefixtures("native")
def test_channels_last_model_makes_no_layout_copy() -> None:
    x = torch.randn(2, 8, 9, 11).to(memory_format=CL).requires_grad_()
    grad = torch.randn(2, 12, 9, 11).to(memory_format=CL)
    model = model_of(CL)
    copies = layout_copies(model, x, grad)
    assert copies == {"deform_conv2d_forward": [], "deform_conv2d_backward": []}
    assert x.grad.is_contiguous(memory_format=CL)
    assert model.weight.grad.is_contiguous(memory_format=CL)


@pytest.mark.usefixtures("native")
def test_contiguous_model_copies_are_seen() -> None:
    """The count is not vacuous: a contiguous model's input is converted inside the op."""
    x = torch.randn(2, 8, 9, 11, requires_grad=True)
    copies = layout_copies(model_of(torch.contiguous_format), x, torch.randn(2, 12, 9, 11))
    assert copies["deform_conv2d_forward"]
    assert copies["deform_conv2d_backward"]


def test_channels_last_model_matches_contiguous(backend: str) -> None:
    x = torch.randn(2, 8, 9, 11, dtype=F64)
    grad = torch.randn(2, 12, 9, 11, dtype=F64)
    results = []
    for memory_format in (torch.contiguous_format, CL):
        model = model_of(memory_format).to(F64)
        leaf = x.to(memory_format=memory_format).detach().requires_grad_()
        out = model(leaf)
        out.backward(grad.to(memory_format=memory_format))
        results.append([out, leaf.grad, *(p.grad for p in model.parameters())])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_strided_offset_and_mask(backend: str) -> None:
    """Offsets as a channel slice of a channels-last tensor, a channels-last mask: the
    same results as contiguous copies, and gradients in the offset's and mask's layout."""
    kwargs = make_conv_inputs(n=2, c_in=4, c_out=6, h=6, w=7, offset_groups=2)
    offset, mask = kwargs["offset"], kwargs["mask"]
    predicted = torch.cat([offset, mask, torch.randn_like(mask)], dim=1).to(memory_format=CL)
    strided = {
        "offset": predicted[:, : offset.shape[1]],
        "mask": predicted[:, offset.shape[1] : offset.shape[1] + mask.shape[1]].contiguous(
            memory_format=CL
        ),
    }
    assert not strided["offset"].is_contiguous()
    assert not strided["offset"].is_contiguous(memory_format=CL)
    names = ("input", "offset", "weight", "mask", "bias")
    results = []
    for arguments in (kwargs, kwargs | strided):
        leaves = {n: arguments[n].detach().requires_grad_() for n in names}
        out = deformops.deform_conv2d(**(arguments | leaves))
        grads = torch.autograd.grad(out, list(leaves.values()), torch.ones_like(out))
        results.append([out, *grads])
    for a, b in zip(*results, strict=True):
        assert relative_error(b, a) <= 1e-12
    assert results[1][4].is_contiguous(memory_format=CL)  # the mask's gradient
