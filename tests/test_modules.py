"""The modules: DeformConv2d (mmcv layout) and DeformAttn2d (Deformable DETR layout), README."""

from __future__ import annotations

import io
import math
import os
import re
from pathlib import Path

import naive
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deformops
from deformops.nn import DeformAttn2d, DeformConv2d

README = Path(__file__).resolve().parents[1] / "README.md"


def _round_trip(module: nn.Module, fresh: nn.Module) -> nn.Module:
    """Loads ``module``'s state dict, saved and read back through ``torch.save``, into ``fresh``."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    return fresh


def _randomize(module: nn.Module, std: float) -> None:
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0.0, std)


# --- DeformConv2d ----------------------------------------------------------------------


def test_conv_readme_shape() -> None:
    assert DeformConv2d(16)(torch.randn(4, 16, 32, 64)).shape == (4, 16, 32, 64)


@pytest.mark.parametrize(
    ("kernel_size", "dilation", "padding"),
    [(3, 1, (1, 1)), (3, 2, (2, 2)), (5, 3, (6, 6)), ((3, 5), 1, (1, 2)), ((3, 5), (2, 1), (2, 2))],
)
def test_conv_default_padding_is_same(
    kernel_size: int | tuple[int, int], dilation: int | tuple[int, int], padding: tuple[int, int]
) -> None:
    layer = DeformConv2d(3, 5, kernel_size=kernel_size, dilation=dilation)
    assert tuple(layer.padding) == padding
    assert tuple(layer.conv_offset.padding) == padding
    assert layer(torch.randn(2, 3, 9, 11)).shape == (2, 5, 9, 11)


CONV_CONFIGS = {
    "default": {"in_channels": 4},
    "grouped": {
        "in_channels": 6,
        "out_channels": 9,
        "kernel_size": (3, 5),
        "stride": (2, 1),
        "dilation": 2,
        "groups": 3,
        "offset_groups": 2,
    },
    "no_bias": {"in_channels": 4, "out_channels": 2, "kernel_size": 1, "bias": False},
}


def _plain_conv(layer: DeformConv2d, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(
        x, layer.weight, None, layer.stride, layer.padding, layer.dilation, layer.groups
    )


def _bias(layer: DeformConv2d) -> torch.Tensor | float:
    return 0.0 if layer.bias is None else layer.bias[None, :, None, None]


@pytest.mark.parametrize("config", list(CONV_CONFIGS))
def test_conv_fresh_modulated_is_half_the_convolution(backend: str, config: str) -> None:
    layer = DeformConv2d(**CONV_CONFIGS[config]).double()
    x = torch.randn(2, layer.in_channels, 7, 8, dtype=torch.float64)
    expected = 0.5 * _plain_conv(layer, x) + _bias(layer)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("config", list(CONV_CONFIGS))
def test_conv_fresh_unmodulated_is_the_convolution(backend: str, config: str) -> None:
    layer = DeformConv2d(**CONV_CONFIGS[config], modulated=False).double()
    x = torch.randn(2, layer.in_channels, 7, 8, dtype=torch.float64)
    expected = _plain_conv(layer, x) + _bias(layer)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_conv_init_as_conv2d() -> None:
    layer = DeformConv2d(8, 16, kernel_size=(3, 5), groups=2)
    bound = 1 / math.sqrt(4 * 3 * 5)  # kaiming_uniform(a=sqrt(5)) and the bias bound of Conv2d
    for p in (layer.weight, layer.bias):
        assert p.abs().max() <= bound
        assert p.abs().max() > 0.8 * bound
    assert layer.conv_offset.weight.abs().max() == 0
    assert layer.conv_offset.bias.abs().max() == 0


@pytest.mark.parametrize(("modulated", "factor"), [(True, 3), (False, 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_parameter_layout_is_mmcv(modulated: bool, factor: int, bias: bool) -> None:
    """Names and shapes of mmcv's ModulatedDeformConv2dPack / DeformConv2dPack."""
    layer = DeformConv2d(
        6,
        4,
        kernel_size=(3, 5),
        stride=2,
        padding=(1, 3),
        dilation=(1, 2),
        groups=2,
        offset_groups=3,
        bias=bias,
        modulated=modulated,
    )
    expected = {
        "weight": (4, 3, 3, 5),
        "conv_offset.weight": (factor * 3 * 15, 6, 3, 5),
        "conv_offset.bias": (factor * 3 * 15,),
    } | ({"bias": (4,)} if bias else {})
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == expected
    offset_conv = layer.conv_offset
    assert isinstance(offset_conv, nn.Conv2d)
    assert offset_conv.kernel_size == (3, 5)
    assert tuple(offset_conv.stride) == (2, 2)
    assert tuple(offset_conv.padding) == (1, 3)
    assert tuple(offset_conv.dilation) == (1, 2)
    assert offset_conv.groups == 1


@pytest.mark.parametrize("modulated", [True, False])
def test_conv_loads_mmcv_state_dict_and_follows_its_forward(backend: str, modulated: bool) -> None:
    """An mmcv-style checkpoint loads, and the offsets/mask are split as mmcv does."""
    g, k = 2, 9
    channels = (3 if modulated else 2) * g * k
    state = {
        "weight": torch.randn(6, 4, 3, 3, dtype=torch.float64),
        "bias": torch.randn(6, dtype=torch.float64),
        "conv_offset.weight": 0.3 * torch.randn(channels, 4, 3, 3, dtype=torch.float64),
        "conv_offset.bias": torch.randn(channels, dtype=torch.float64),
    }
    layer = DeformConv2d(4, 6, offset_groups=g, modulated=modulated).double()
    layer.load_state_dict(state)
    x = torch.randn(2, 4, 6, 7, dtype=torch.float64)
    predicted = F.conv2d(x, state["conv_offset.weight"], state["conv_offset.bias"], padding=1)
    if modulated:  # mmcv: o1, o2, mask = torch.chunk(out, 3, dim=1)
        o1, o2, logits = torch.chunk(predicted, 3, dim=1)
        offset, mask = torch.cat((o1, o2), dim=1), torch.sigmoid(logits)
    else:
        offset, mask = predicted, None
    expected = naive.deform_conv2d(x, offset, state["weight"], state["bias"], 1, 1, 1, mask)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("modulated", [True, False])
def test_conv_explicit_offset_and_mask(backend: str, modulated: bool) -> None:
    layer = DeformConv2d(4, 6, stride=2, offset_groups=2, modulated=modulated)
    x = torch.randn(2, 4, 7, 8)
    offset = 2 * torch.randn(2, 36, 4, 4)
    mask = torch.rand(2, 18, 4, 4)
    for m in (mask, None):
        expected = deformops.deform_conv2d(x, offset, layer.weight, layer.bias, 2, 1, 1, m)
        torch.testing.assert_close(layer(x, offset, m), expected, rtol=0, atol=0)


def _nontrivial_conv(**kwargs: object) -> DeformConv2d:
    layer = DeformConv2d(4, 6, offset_groups=2, **kwargs)
    with torch.no_grad():
        layer.conv_offset.weight.normal_(0.0, 0.3)
        layer.conv_offset.bias.normal_(0.0, 1.0)
    return layer


def test_conv_state_dict_round_trip(backend: str) -> None:
    layer = _nontrivial_conv()
    fresh = _round_trip(layer, DeformConv2d(4, 6, offset_groups=2))
    x = torch.randn(2, 4, 6, 7)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("modulated", [True, False])
def test_conv_gradients_reach_every_parameter(backend: str, modulated: bool) -> None:
    layer = _nontrivial_conv(modulated=modulated)
    x = torch.randn(2, 4, 6, 7, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad is not None
    assert x.grad.abs().sum() > 0
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


def test_conv_channels_last_module(backend: str) -> None:
    """``model.to(memory_format=torch.channels_last)`` (weights in channels_last too)."""
    layer = _nontrivial_conv()
    x = torch.randn(2, 4, 6, 7)
    expected = layer(x)
    layer = layer.to(memory_format=torch.channels_last)
    out = layer(x.contiguous(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected)


# --- DeformAttn2d ----------------------------------------------------------------------


def test_attn_parameter_layout_is_deformable_detr() -> None:
    layer = DeformAttn2d()  # embed_dim 256, 8 heads, 4 levels, 4 points
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == {
        "sampling_offsets.weight": (256, 256),
        "sampling_offsets.bias": (256,),
        "attention_weights.weight": (128, 256),
        "attention_weights.bias": (128,),
        "value_proj.weight": (256, 256),
        "value_proj.bias": (256,),
        "output_proj.weight": (256, 256),
        "output_proj.bias": (256,),
    }


@pytest.mark.parametrize(("heads", "levels", "points"), [(8, 4, 4), (6, 3, 2), (3, 1, 5)])
def test_attn_init_is_deformable_detr(heads: int, levels: int, points: int) -> None:
    c = 12 * heads
    layer = DeformAttn2d(embed_dim=c, num_heads=heads, num_levels=levels, num_points=points)
    assert layer.sampling_offsets.weight.abs().max() == 0
    torch.testing.assert_close(
        layer.sampling_offsets.bias.double(),
        naive.deform_attn2d_offset_bias(heads, levels, points),
        rtol=1e-6,
        atol=1e-6,
    )
    assert layer.attention_weights.weight.abs().max() == 0
    assert layer.attention_weights.bias.abs().max() == 0
    bound = math.sqrt(6 / (c + c))  # xavier_uniform
    for proj in (layer.value_proj, layer.output_proj):
        assert proj.bias.abs().max() == 0
        assert proj.weight.abs().max() <= bound
        assert proj.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)


LEVELS = ((6, 8), (3, 4), (1, 2))


def _attn_case(
    head_dim: int = 12, heads: int = 2, points: int = 3, box: bool = False, n: int = 2, q: int = 5
) -> tuple[DeformAttn2d, dict[str, torch.Tensor]]:
    """A float64 layer with random parameters and its inputs (flattened value)."""
    c = head_dim * heads
    layer = DeformAttn2d(embed_dim=c, num_heads=heads, num_levels=len(LEVELS), num_points=points)
    layer = layer.double()
    _randomize(layer, 1.0 / math.sqrt(c))
    maps = [torch.randn(n, c, h, w, dtype=torch.float64) for h, w in LEVELS]
    value, shapes, starts = naive.flatten_levels(maps)
    centres = torch.rand(n, q, len(LEVELS), 2, dtype=torch.float64)
    sizes = 0.05 + 0.5 * torch.rand(n, q, len(LEVELS), 2, dtype=torch.float64)
    inputs = {
        "query": torch.randn(n, q, c, dtype=torch.float64),
        "reference_points": torch.cat([centres, sizes], -1) if box else centres,
        "value": value,
        "spatial_shapes": shapes,
        "level_start_index": starts,
    }
    return layer, inputs


def _attn_naive(
    layer: DeformAttn2d, inputs: dict[str, torch.Tensor], **extra: torch.Tensor
) -> torch.Tensor:
    return naive.deform_attn2d(
        layer.state_dict(),
        layer.num_heads,
        layer.num_levels,
        layer.num_points,
        **inputs,
        **extra,
    )


@pytest.mark.parametrize("head_dim", [12, 48])
@pytest.mark.parametrize("box", [False, True], ids=["points", "boxes"])
def test_attn_matches_deformable_detr(backend: str, head_dim: int, box: bool) -> None:
    layer, inputs = _attn_case(head_dim=head_dim, box=box)
    torch.testing.assert_close(layer(**inputs), _attn_naive(layer, inputs), rtol=1e-10, atol=1e-10)


def test_attn_positional_order(backend: str) -> None:
    layer, a = _attn_case()
    mask = torch.rand(a["value"].shape[:2]) < 0.3
    positional = layer(
        a["query"],
        a["reference_points"],
        a["value"],
        a["spatial_shapes"],
        a["level_start_index"],
        mask,
    )
    torch.testing.assert_close(positional, layer(**a, padding_mask=mask), rtol=0, atol=0)


def test_attn_float32_close_to_float64(backend: str) -> None:
    layer, inputs = _attn_case(head_dim=12, box=True)
    expected = _attn_naive(layer, inputs)
    out = layer.float()(**{k: v.float() if v.is_floating_point() else v for k, v in inputs.items()})
    assert out.dtype == torch.float32
    assert naive.relative_error(out, expected) <= 1e-5


def test_attn_padding_mask(backend: str) -> None:
    layer, inputs = _attn_case()
    mask = torch.rand(inputs["value"].shape[:2]) < 0.3
    out = layer(**inputs, padding_mask=mask)
    torch.testing.assert_close(
        out, _attn_naive(layer, inputs, padding_mask=mask), rtol=1e-10, atol=1e-10
    )
    changed = inputs["value"].masked_fill(mask[..., None], 1e3)
    torch.testing.assert_close(
        layer(**{**inputs, "value": changed}, padding_mask=mask), out, rtol=1e-10, atol=1e-10
    )
    assert not torch.allclose(layer(**inputs), out)


def test_attn_value_as_list_of_maps(backend: str) -> None:
    layer, inputs = _attn_case()
    n, _, c = inputs["value"].shape
    sizes = [h * w for h, w in LEVELS]
    maps = [
        level.transpose(1, 2).reshape(n, c, h, w)
        for level, (h, w) in zip(inputs["value"].split(sizes, dim=1), LEVELS, strict=True)
    ]
    flat = layer(**inputs)
    listed = layer(inputs["query"], inputs["reference_points"], maps)
    torch.testing.assert_close(listed, flat, rtol=0, atol=0)
    without_starts = layer(**{**inputs, "level_start_index": None})
    torch.testing.assert_close(without_starts, flat, rtol=0, atol=0)


def test_attn_checkpoint_round_trip(backend: str) -> None:
    layer, inputs = _attn_case()
    fresh = DeformAttn2d(embed_dim=24, num_heads=2, num_levels=3, num_points=3).double()
    fresh = _round_trip(layer, fresh)
    torch.testing.assert_close(fresh(**inputs), layer(**inputs), rtol=0, atol=0)


def test_attn_gradients_reach_every_parameter(backend: str) -> None:
    layer, inputs = _attn_case(box=True)
    inputs["query"].requires_grad_()
    inputs["value"].requires_grad_()
    layer(**inputs).square().sum().backward()
    for name in ("query", "value"):
        assert inputs[name].grad.abs().sum() > 0, name
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


# --- README ----------------------------------------------------------------------------


def _readme_blocks() -> list[str]:
    text = README.read_text(encoding="utf-8") if README.exists() else ""
    return re.findall(r"^```python[ \t]*\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def test_readme_python_blocks_run() -> None:
    blocks = _readme_blocks()
    if not blocks:
        message = f"{README} has no ```python block"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    code = "\n".join(blocks)
    assert "DeformConv2d(16)" in code, "README lacks the DeformConv2d(16) example"
    assert "DeformAttn2d(" in code, "README lacks a DeformAttn2d example"
    namespace: dict[str, object] = {"__name__": "__readme__"}
    for index, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {index + 1}", "exec"), namespace)
