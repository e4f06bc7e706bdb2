"""``torch.autocast("cpu", dtype=torch.bfloat16)`` with both operators and both modules.

Each operator must run in the autocast dtype (the attention's sampling locations and
weights in float32), give the result of the same call made outside autocast on inputs
cast by hand, return gradients in each input's own dtype, and do the same through the
raw ``torch.ops.deformops`` operators, under ``torch.compile(fullgraph=True)`` and in a
``torch.amp.GradScaler`` training step. The CUDA versions (float16 and bfloat16) are in
``tests/gpu/test_cuda_training.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch._dynamo
from conftest import make_conv_inputs, make_msda_inputs
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import deformops
from deformops.nn import DeformAttn2d, DeformConv2d

BF16 = torch.bfloat16
F32 = torch.float32
CONV_FLOATS = ("input", "offset", "weight", "mask", "bias")
MSDA_FLOATS = ("value", "sampling_locations", "attention_weights")
# Argument dtypes of the attention under bfloat16 autocast: value, level tables, locations,
# weights.
MSDA_AUTOCAST = [BF16, torch.int64, torch.int64, F32, F32]


class RecordDtypes(TorchDispatchMode):
    """Records the dtypes of the tensor arguments of every ``deformops`` operator call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, list[torch.dtype | None]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "deformops":
            dtypes = [a.dtype if isinstance(a, Tensor) else None for a in args]
            self.calls[func.__name__.split(".")[0]] = dtypes
        return func(*args, **(kwargs or {}))


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _conv_args(dtypes: dict[str, torch.dtype] | None = None) -> dict[str, Any]:
    """Convolution arguments in float32 (or ``dtypes`` per name), leaves requiring grad."""
    kwargs = make_conv_inputs(n=2, c_in=4, c_out=6, h=6, w=7, offset_groups=2)
    for name in CONV_FLOATS:
        dtype = (dtypes or {}).get(name, F32)
        kwargs[name] = kwargs[name].to(dtype).requires_grad_()
    return kwargs


def _msda_args(dtypes: dict[str, torch.dtype] | None = None) -> dict[str, Any]:
    kwargs = make_msda_inputs(n=2, m=2, d=4, q=5, p=3)
    for name in MSDA_FLOATS:
        dtype = (dtypes or {}).get(name, F32)
        kwargs[name] = kwargs[name].to(dtype).requires_grad_()
    return kwargs


def _cast_by_hand(kwargs: dict[str, Any], dtypes: dict[str, torch.dtype]) -> dict[str, Any]:
    """The same arguments, detached, in ``dtypes``, requiring grad."""
    out = dict(kwargs)
    for name, dtype in dtypes.items():
        out[name] = kwargs[name].detach().to(dtype).requires_grad_()
    return out


def _grads(out: Tensor, kwargs: dict[str, Any], names: tuple[str, ...]) -> list[Tensor]:
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    return list(torch.autograd.grad(out, [kwargs[n] for n in names], grad))


def test_conv_runs_in_autocast_dtype(backend: str) -> None:
    kwargs = _conv_args()
    with torch.autocast("cpu", dtype=BF16), RecordDtypes() as record:
        out = deformops.deform_conv2d(**kwargs)
    assert out.dtype == BF16
    assert record.calls["deform_conv2d"][:5] == [BF16] * 5
    grads = _grads(out, kwargs, CONV_FLOATS)
    assert [g.dtype for g in grads] == [F32] * 5

    by_hand = _cast_by_hand(kwargs, dict.fromkeys(CONV_FLOATS, BF16))
    expected = deformops.deform_conv2d(**by_hand)
    assert torch.equal(out, expected)
    for g, e in zip(grads, _grads(expected, by_hand, CONV_FLOATS), strict=True):
        assert torch.equal(g, e.to(F32))


def test_msda_keeps_locations_and_weights_in_float32(backend: str) -> None:
    kwargs = _msda_args()
    with torch.autocast("cpu", dtype=BF16), RecordDtypes() as record:
        out = deformops.multi_scale_deformable_attention(**kwargs)
    assert out.dtype == BF16
    assert record.calls["multi_scale_deformable_attention"] == MSDA_AUTOCAST
    grads = _grads(out, kwargs, MSDA_FLOATS)
    assert [g.dtype for g in grads] == [F32] * 3

    by_hand = _cast_by_hand(kwargs, {"value": BF16})
    expected = deformops.multi_scale_deformable_attention(**by_hand)
    assert torch.equal(out, expected)
    for g, e in zip(grads, _grads(expected, by_hand, MSDA_FLOATS), strict=True):
        assert torch.equal(g, e.to(F32))


def test_msda_half_locations_come_to_float32(backend: str) -> None:
    """Locations and weights already in bfloat16 (from an autocast layer) go up to float32."""
    kwargs = _msda_args({"sampling_locations": BF16, "attention_weights": BF16})
    with torch.autocast("cpu", dtype=BF16), RecordDtypes() as record:
        out = deformops.multi_scale_deformable_attention(**kwargs)
    assert record.calls["multi_scale_deformable_attention"] == MSDA_AUTOCAST
    grads = _grads(out, kwargs, MSDA_FLOATS)
    assert [g.dtype for g in grads] == [F32, BF16, BF16]


def test_gradients_come_back_in_each_inputs_dtype(backend: str) -> None:
    """Inputs already in bfloat16 beside float32 parameters: each gradient in its own dtype."""
    dtypes = {"input": BF16, "offset": BF16, "mask": BF16}
    kwargs = _conv_args(dtypes)
    with torch.autocast("cpu", dtype=BF16):
        out = deformops.deform_conv2d(**kwargs)
    grads = _grads(out, kwargs, CONV_FLOATS)
    assert [g.dtype for g in grads] == [dtypes.get(n, F32) for n in CONV_FLOATS]


def test_raw_operators_autocast(backend: str) -> None:
    """``torch.ops.deformops`` operators carry the same autocast rule as the functions."""
    conv = _conv_args()
    msda = _msda_args()
    with torch.autocast("cpu", dtype=BF16), RecordDtypes() as record:
        conv_out = torch.ops.deformops.deform_conv2d(
            *(conv[n] for n in CONV_FLOATS[:3]), conv["mask"], conv["bias"], 1, 1, 1, 1, 1, 1
        )
        msda_out = torch.ops.deformops.multi_scale_deformable_attention(*msda.values())
    assert conv_out.dtype == BF16
    assert msda_out.dtype == BF16
    assert record.calls["deform_conv2d"][:5] == [BF16] * 5
    assert record.calls["multi_scale_deformable_attention"] == MSDA_AUTOCAST
    expected = deformops.deform_conv2d(**_cast_by_hand(conv, dict.fromkeys(CONV_FLOATS, BF16)))
    assert torch.equal(conv_out, expected)


def test_float64_is_left_alone(backend: str) -> None:
    """Autocast does not lower float64 (as for PyTorch's own operators)."""
    kwargs = make_msda_inputs(n=1, q=3)
    with torch.autocast("cpu", dtype=BF16):
        out = deformops.multi_scale_deformable_attention(**kwargs)
        conv_out = deformops.deform_conv2d(**make_conv_inputs(n=1))
    assert out.dtype == conv_out.dtype == torch.float64


def test_disabled_autocast_changes_nothing(backend: str) -> None:
    kwargs = _conv_args()
    with torch.autocast("cpu", dtype=BF16, enabled=False):
        out = deformops.deform_conv2d(**kwargs)
    assert out.dtype == F32


class Model(nn.Module):
    """A deformable convolution feeding a deformable attention over two of its levels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = DeformConv2d(8, 8, offset_groups=2)
        self.attn = DeformAttn2d(8, num_heads=2, num_levels=2, num_points=2)
        torch.manual_seed(0)
        with torch.no_grad():
            for name, parameter in self.named_parameters():
                if "offset" in name or "attention_weights" in name:
                    parameter.normal_(0.0, 0.2)

    def forward(self, x: Tensor, query: Tensor, reference_points: Tensor) -> Tensor:
        features = self.conv(x)
        maps = [features, nn.functional.avg_pool2d(features, 2)]
        return self.attn(query, reference_points, maps)


def model_inputs() -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 8, 8, 10, generator=generator)
    query = torch.randn(2, 6, 8, generator=generator)
    reference_points = torch.rand(2, 6, 2, 2, generator=generator)
    return x, query, reference_points


def test_modules_under_autocast_and_compile(backend: str) -> None:
    """Eager and ``torch.compile(fullgraph=True)`` (dynamo + AOTAutograd) agree under autocast."""
    model = Model()
    inputs = model_inputs()

    def loss_and_grads(fn) -> list[Tensor]:
        model.zero_grad()
        with torch.autocast("cpu", dtype=BF16):
            out = fn(*inputs)
        assert out.dtype == BF16
        out.float().square().mean().backward()
        return [out.detach()] + [p.grad.clone() for p in model.parameters()]

    eager = loss_and_grads(model)
    compiled = loss_and_grads(torch.compile(model, fullgraph=True, backend="aot_eager"))
    assert all(p.grad.dtype == F32 for p in model.parameters())
    for e, c in zip(eager, compiled, strict=True):
        torch.testing.assert_close(c, e, rtol=2e-2, atol=2e-3)


def test_grad_scaler_training_step(backend: str) -> None:
    model = Model()
    inputs = model_inputs()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = [p.detach().clone() for p in model.parameters()]
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=BF16):
            loss = model(*inputs).float().square().mean()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    assert scaler.get_scale() == 2.0**10  # no step was skipped for an inf or NaN
    for parameter in model.parameters():
        assert parameter.dtype == F32
        assert torch.isfinite(parameter).all()
    assert any(not torch.equal(o, n) for o, n in zip(before, model.parameters(), strict=True))
    assert losses[-1] < losses[0]
