"""mmcv/mmdet checkpoints: state dicts of mmcv's ``ModulatedDeformConv2dPack``,
``DeformConv2dPack`` and ``MultiScaleDeformableAttention``, built here by name and shape as
mmcv writes them, load into ``deformops.nn.DeformConv2d`` / ``DeformAttn2d`` and into the
mmcv-signature layers of ``deformops.integrations.mmcv``, whose forward is checked against
a re-implementation of mmcv's formulation (pure torch, below; mmcv is not installed).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deformops.integrations import mmcv as mmcv_layers
from deformops.nn import DeformAttn2d, DeformConv2d

F64 = torch.float64

# --- mmcv's formulation ---------------------------------------------------------------------


def mmcv_deform_conv(
    x: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    deform_groups: int,
) -> Tensor:
    """mmcv's ``(modulated_)deformable_im2col`` followed by one GEMM per group.

    For kernel point ``(i, j)`` of output ``(ho, wo)`` and deformable group ``g``: ``h_im =
    ho*sh - ph + i*dh + offset[g, 2*(i*kw + j)]``, ``w_im`` likewise with ``offset[g, 2*(i*kw
    + j) + 1]``; the column is zero unless ``-1 < h_im < H`` and ``-1 < w_im < W``, else the
    bilinear sum of the four corners that lie in the map (times the mask in DCN v2). The
    columns ``[C_in*kh*kw, H_out*W_out]`` are multiplied by ``weight`` viewed as
    ``[C_out, C_in/groups*kh*kw]`` per group.
    """
    n, c, h, w = x.shape
    c_out, c_per_group, kh, kw = weight.shape
    groups = c // c_per_group
    ho, wo = offset.shape[-2:]
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    k, g = kh * kw, deform_groups
    rows = (torch.arange(ho) * sh - ph).view(1, ho, 1) + (torch.arange(kh) * dh).repeat_interleave(
        kw
    ).view(k, 1, 1)
    cols = (torch.arange(wo) * sw - pw).view(1, 1, wo) + (torch.arange(kw) * dw).repeat(kh).view(
        k, 1, 1
    )
    pairs = offset.view(n, g, k, 2, ho, wo)
    h_im = rows.to(x.dtype) + pairs[:, :, :, 0]  # [N, G, K, H_out, W_out]
    w_im = cols.to(x.dtype) + pairs[:, :, :, 1]
    inside = (h_im > -1) & (w_im > -1) & (h_im < h) & (w_im < w)
    h_low, w_low = h_im.floor(), w_im.floor()
    lh, lw = h_im - h_low, w_im - w_low
    planes = x.reshape(n, g, 1, c // g, h * w)
    columns = torch.zeros(n, g, c // g, k, ho, wo, dtype=x.dtype)
    for dy, dx, corner_weight in (
        (0, 0, (1 - lh) * (1 - lw)),
        (0, 1, (1 - lh) * lw),
        (1, 0, lh * (1 - lw)),
        (1, 1, lh * lw),
    ):
        hc, wc = (h_low + dy).long(), (w_low + dx).long()
        valid = (hc >= 0) & (hc <= h - 1) & (wc >= 0) & (wc <= w - 1)
        index = (hc.clamp(0, h - 1) * w + wc.clamp(0, w - 1)).view(n, g, 1, 1, -1)
        sampled = torch.take_along_dim(planes, index.expand(n, g, 1, c // g, -1), dim=-1)
        sampled = sampled.view(n, g, c // g, k, ho, wo)
        columns += sampled * (corner_weight * valid * inside).unsqueeze(2)
    if mask is not None:
        columns = columns * mask.view(n, g, 1, k, ho, wo)
    columns = columns.reshape(n, groups, c_per_group * k, ho * wo)
    out = torch.einsum("gok,ngkp->ngop", weight.view(groups, c_out // groups, -1), columns)
    out = out.reshape(n, c_out, ho, wo)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def mmcv_pack_forward(state: dict[str, Tensor], x: Tensor, config: dict[str, Any]) -> Tensor:
    """``ModulatedDeformConv2dPack.forward`` (``modulated``) or ``DeformConv2dPack.forward``."""
    geometry = {key: config[key] for key in ("stride", "padding", "dilation")}
    out = F.conv2d(x, state["conv_offset.weight"], state["conv_offset.bias"], **geometry)
    if config["modulated"]:
        o1, o2, logits = torch.chunk(out, 3, dim=1)
        offset, mask = torch.cat((o1, o2), dim=1), torch.sigmoid(logits)
    else:
        offset, mask = out, None
    pairs = {key: (v, v) if isinstance(v, int) else v for key, v in geometry.items()}
    return mmcv_deform_conv(
        x, offset, mask, state["weight"], state.get("bias"), **pairs, deform_groups=config["g"]
    )


def mmcv_msda_pytorch(value: Tensor, shapes: Tensor, locations: Tensor, weights: Tensor) -> Tensor:
    """mmcv's ``multi_scale_deformable_attn_pytorch``: ``grid_sample`` per level."""
    n, _, m, d = value.shape
    _, q, _, levels, points, _ = locations.shape
    sizes = [int(h) * int(w) for h, w in shapes.tolist()]
    grids = 2 * locations - 1
    samples = []
    for level, (per_level, (h, w)) in enumerate(
        zip(value.split(sizes, dim=1), shapes.tolist(), strict=True)
    ):
        maps = per_level.flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        samples.append(F.grid_sample(maps, grid, "bilinear", "zeros", align_corners=False))
    weights = weights.transpose(1, 2).reshape(n * m, 1, q, levels * points)
    out = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1).view(n, m * d, q)
    return out.transpose(1, 2)


def mmcv_msda_forward(
    state: dict[str, Tensor],
    sizes: tuple[int, int, int],
    query: Tensor,
    value: Tensor,
    identity: Tensor | None,
    query_pos: Tensor | None,
    key_padding_mask: Tensor | None,
    reference_points: Tensor,
    spatial_shapes: Tensor,
    batch_first: bool,
) -> Tensor:
    """``MultiScaleDeformableAttention.forward`` of mmcv (eval mode: no dropout)."""
    m, levels, points = sizes
    identity = query if identity is None else identity
    if query_pos is not None:
        query = query + query_pos
    if not batch_first:
        query, value = query.permute(1, 0, 2), value.permute(1, 0, 2)
    n, q, _ = query.shape
    s = value.shape[1]
    value = F.linear(value, state["value_proj.weight"], state["value_proj.bias"])
    if key_padding_mask is not None:
        value = value.masked_fill(key_padding_mask[..., None], 0.0)
    value = value.view(n, s, m, -1)
    offsets = F.linear(query, state["sampling_offsets.weight"], state["sampling_offsets.bias"])
    offsets = offsets.view(n, q, m, levels, points, 2)
    weights = F.linear(query, state["attention_weights.weight"], state["attention_weights.bias"])
    weights = weights.view(n, q, m, levels * points).softmax(-1)
    weights = weights.view(n, q, m, levels, points)
    if reference_points.shape[-1] == 2:
        normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
        locations = (
            reference_points[:, :, None, :, None, :]
            + offsets / normalizer[None, None, None, :, None, :]
        )
    else:
        locations = (
            reference_points[:, :, None, :, None, :2]
            + offsets / points * reference_points[:, :, None, :, None, 2:] * 0.5
        )
    out = mmcv_msda_pytorch(value, spatial_shapes, locations, weights)
    out = F.linear(out, state["output_proj.weight"], state["output_proj.bias"])
    if not batch_first:
        out = out.permute(1, 0, 2)
    return out + identity


# --- state dicts as mmcv writes them -----------------------------------------------------


def _with_metadata(state: OrderedDict[str, Tensor], versions: dict[str, int]) -> Any:
    """The ``_metadata`` that ``nn.Module.state_dict`` attaches (each module's ``_version``)."""
    state._metadata = OrderedDict((prefix, {"version": v}) for prefix, v in versions.items())  # type: ignore[attr-defined]
    return state


def mmcv_dcn_state(config: dict[str, Any]) -> OrderedDict[str, Tensor]:
    """A state dict of ``ModulatedDeformConv2dPack`` (``modulated``) or ``DeformConv2dPack``
    with random values: ``weight`` ``[C_out, C_in/groups, kh, kw]``, ``bias`` ``[C_out]``
    (DCN v2 with bias only), ``conv_offset.weight`` ``[(3 or 2)*G*kh*kw, C_in, kh, kw]``,
    ``conv_offset.bias``; the packs are at version 2, their ``conv_offset`` at 1."""
    c_in, c_out, (kh, kw), groups = config["c_in"], config["c_out"], config["k"], config["groups"]
    offset_channels = (3 if config["modulated"] else 2) * config["g"] * kh * kw
    generator = torch.Generator().manual_seed(5)

    def randn(*shape: int, std: float = 1.0) -> Tensor:
        return std * torch.randn(*shape, generator=generator, dtype=F64)

    state = OrderedDict(weight=randn(c_out, c_in // groups, kh, kw))
    if config["modulated"] and config["bias"]:
        state["bias"] = randn(c_out)
    state["conv_offset.weight"] = randn(offset_channels, c_in, kh, kw, std=0.2)
    state["conv_offset.bias"] = randn(offset_channels)
    return _with_metadata(state, {"": 2, "conv_offset": 1})


def mmcv_msda_state(c: int, m: int, levels: int, points: int) -> OrderedDict[str, Tensor]:
    """A state dict of mmcv's ``MultiScaleDeformableAttention`` with random values."""
    generator = torch.Generator().manual_seed(6)
    samples = m * levels * points
    shapes = {
        "sampling_offsets.weight": (samples * 2, c),
        "sampling_offsets.bias": (samples * 2,),
        "attention_weights.weight": (samples, c),
        "attention_weights.bias": (samples,),
        "value_proj.weight": (c, c),
        "value_proj.bias": (c,),
        "output_proj.weight": (c, c),
        "output_proj.bias": (c,),
    }
    state = OrderedDict(
        (name, torch.randn(shape, generator=generator, dtype=F64) / math.sqrt(c))
        for name, shape in shapes.items()
    )
    versions = {"": 1} | {name: 1 for name in ("sampling_offsets", "attention_weights")}
    versions |= {"value_proj": 1, "output_proj": 1, "dropout": 1}
    return _with_metadata(state, versions)


# --- deformable convolution -----------------------------------------------------------------

CONV_CONFIGS = {
    "dcnv2_resnet": {  # mmdet's ResNet with dcn=dict(type="DCNv2"): bias=False
        "c_in": 8, "c_out": 8, "k": (3, 3), "stride": 1, "padding": 1, "dilation": 1,
        "groups": 1, "g": 1, "modulated": True, "bias": False,
    },
    "dcnv2_bias_strided": {
        "c_in": 6, "c_out": 9, "k": (3, 5), "stride": (2, 1), "padding": (2, 1),
        "dilation": (2, 1), "groups": 3, "g": 2, "modulated": True, "bias": True,
    },
    "dcn_v1": {
        "c_in": 8, "c_out": 4, "k": (3, 3), "stride": 2, "padding": 1, "dilation": 1,
        "groups": 2, "g": 4, "modulated": False, "bias": False,
    },
}  # fmt: skip


def _deformops_conv(config: dict[str, Any]) -> DeformConv2d:
    return DeformConv2d(
        config["c_in"],
        config["c_out"],
        config["k"],
        config["stride"],
        config["padding"],
        config["dilation"],
        config["groups"],
        offset_groups=config["g"],
        bias=config["bias"],
        modulated=config["modulated"],
    )


def _mmcv_conv(config: dict[str, Any]) -> DeformConv2d:
    pack = (
        mmcv_layers.ModulatedDeformConv2dPack
        if config["modulated"]
        else mmcv_layers.DeformConv2dPack
    )
    return pack(
        config["c_in"],
        config["c_out"],
        config["k"],
        stride=config["stride"],
        padding=config["padding"],
        dilation=config["dilation"],
        groups=config["groups"],
        deform_groups=config["g"],
        bias=config["bias"],
    )


@pytest.mark.parametrize("layer", ["deformops.nn", "integrations.mmcv"])
@pytest.mark.parametrize("name", list(CONV_CONFIGS))
def test_conv_loads_mmcv_state_dict_and_matches_mmcv(backend: str, name: str, layer: str) -> None:
    config = CONV_CONFIGS[name]
    state = mmcv_dcn_state(config)
    module = (_deformops_conv if layer == "deformops.nn" else _mmcv_conv)(config).double()
    module.load_state_dict(state, strict=True)
    x = torch.randn(2, config["c_in"], 9, 11, dtype=F64)
    expected = mmcv_pack_forward(state, x, config)
    torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-10)


def test_conv_loads_inside_an_mmdet_model(backend: str) -> None:
    """A Bottleneck-like block whose ``conv2`` is a DCNv2, as in an mmdet ResNet checkpoint."""
    config = CONV_CONFIGS["dcnv2_resnet"]
    block = nn.Module()
    block.conv1 = nn.Conv2d(8, 8, 1, bias=False)
    block.conv2 = mmcv_layers.ModulatedDeformConv2dPack(8, 8, 3, padding=1, bias=False)
    dcn = mmcv_dcn_state(config)
    state = OrderedDict(
        [("backbone.layer1.0.conv1.weight", torch.randn(8, 8, 1, 1, dtype=F64))]
        + [(f"backbone.layer1.0.conv2.{key}", value) for key, value in dcn.items()]
    )
    model = nn.Module()
    model.backbone = nn.Module()
    model.backbone.layer1 = nn.ModuleList([block])
    model.double().load_state_dict(state, strict=True)
    x = torch.randn(2, 8, 7, 7, dtype=F64)
    torch.testing.assert_close(
        block.conv2(x), mmcv_pack_forward(dcn, x, config), rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize("name", list(CONV_CONFIGS))
def test_mmcv_conv_layers_have_mmcv_parameters(name: str) -> None:
    config = CONV_CONFIGS[name]
    module = _mmcv_conv(config)
    expected = {key: tuple(value.shape) for key, value in mmcv_dcn_state(config).items()}
    assert {key: tuple(value.shape) for key, value in module.state_dict().items()} == expected
    assert module.deform_groups == config["g"]
    assert module.conv_offset.weight.abs().max() == 0
    assert module.conv_offset.bias.abs().max() == 0
    kh, kw = config["k"]
    if config["modulated"]:  # uniform in 1/sqrt(C_in*kh*kw), zero bias
        bound = 1 / math.sqrt(config["c_in"] * kh * kw)
    else:  # kaiming_uniform(nonlinearity="relu"): sqrt(6 / fan_in)
        bound = math.sqrt(6 / (config["c_in"] // config["groups"] * kh * kw))
    assert 0.7 * bound < module.weight.abs().max() <= bound
    nn.init.normal_(module.conv_offset.weight)  # as mmengine's Kaiming pass over Conv2d layers
    module.init_weights()
    assert module.conv_offset.weight.abs().max() == 0
    assert 0.7 * bound < module.weight.abs().max() <= bound


def test_mmcv_conv_defaults_are_mmcv() -> None:
    """``padding=0`` (mmcv's default, unlike ``DeformConv2d``'s "same"); DCN v2 has a bias
    by default, DCN v1 none."""
    v2 = mmcv_layers.ModulatedDeformConv2dPack(4, 4, 3)
    v1 = mmcv_layers.DeformConv2dPack(4, 4, 3)
    for layer in (v2, v1):
        assert tuple(layer.padding) == (0, 0)
        assert layer(torch.randn(1, 4, 7, 7)).shape == (1, 4, 5, 5)
    assert v2.bias is not None
    assert v1.bias is None
    with pytest.raises(ValueError, match="bias: mmcv's DeformConv2dPack has no bias"):
        mmcv_layers.DeformConv2dPack(4, 4, 3, bias=True)


# --- multi-scale deformable attention -------------------------------------------------------

LEVELS = ((6, 8), (3, 4), (2, 2))


def _msda_inputs(c: int, box: bool, masked: bool) -> dict[str, Tensor | None]:
    """Batch-first inputs: query ``[N, Q, C]``, value ``[N, S, C]``."""
    n, q = 2, 5
    shapes = torch.tensor(LEVELS)
    s = int(shapes.prod(1).sum())
    centres = torch.rand(n, q, len(LEVELS), 2, dtype=F64)
    boxes = torch.cat([centres, 0.05 + 0.5 * torch.rand(n, q, len(LEVELS), 2, dtype=F64)], -1)
    return {
        "query": torch.randn(n, q, c, dtype=F64),
        "value": torch.randn(n, s, c, dtype=F64),
        "identity": torch.randn(n, q, c, dtype=F64),
        "query_pos": torch.randn(n, q, c, dtype=F64),
        "key_padding_mask": (torch.rand(n, s) < 0.3) if masked else None,
        "reference_points": boxes if box else centres,
        "spatial_shapes": shapes,
    }


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "padding_mask"])
@pytest.mark.parametrize("box", [False, True], ids=["points", "boxes"])
def test_attn_state_dict_loads_into_deform_attn2d(backend: str, box: bool, masked: bool) -> None:
    """mmcv's forward is ``DeformAttn2d``'s with the positional encoding added to the query
    and the residual ``identity`` added to the output (eval mode, batch first)."""
    c, m, points = 24, 3, 2  # head dim 8
    state = mmcv_msda_state(c, m, len(LEVELS), points)
    layer = DeformAttn2d(embed_dim=c, num_heads=m, num_levels=len(LEVELS), num_points=points)
    layer.double().load_state_dict(state, strict=True)
    a = _msda_inputs(c, box, masked)
    out = layer(
        a["query"] + a["query_pos"],
        a["reference_points"],
        a["value"],
        a["spatial_shapes"],
        padding_mask=a["key_padding_mask"],
    )
    expected = mmcv_msda_forward(state, (m, len(LEVELS), points), **a, batch_first=True)
    torch.testing.assert_close(out + a["identity"], expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "sequence_first"])
@pytest.mark.parametrize("box", [False, True], ids=["points", "boxes"])
def test_mmcv_attn_layer_matches_mmcv(backend: str, batch_first: bool, box: bool) -> None:
    c, m, points = 32, 4, 3
    state = mmcv_msda_state(c, m, len(LEVELS), points)
    layer = mmcv_layers.MultiScaleDeformableAttention(
        c, m, len(LEVELS), points, batch_first=batch_first
    )
    layer.double().eval().load_state_dict(state, strict=True)
    a = _msda_inputs(c, box, masked=True)
    if not batch_first:  # mmcv's default layout: [Q, N, C] and [S, N, C]
        for key in ("query", "value", "identity", "query_pos"):
            a[key] = a[key].transpose(0, 1)
    expected = mmcv_msda_forward(state, (m, len(LEVELS), points), **a, batch_first=batch_first)
    torch.testing.assert_close(layer(**a), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "sequence_first"])
def test_mmcv_attn_layer_encoder_self_attention(backend: str, batch_first: bool) -> None:
    """As in an encoder: ``value`` and ``identity`` default to the query (``Q = S``)."""
    c, m, points = 16, 2, 2
    state = mmcv_msda_state(c, m, len(LEVELS), points)
    layer = mmcv_layers.MultiScaleDeformableAttention(
        c, m, len(LEVELS), points, batch_first=batch_first
    )
    layer.double().eval().load_state_dict(state, strict=True)
    shapes = torch.tensor(LEVELS)
    s = int(shapes.prod(1).sum())
    query = torch.randn(s, 2, c, dtype=F64)  # [S, N, C]
    query = query.transpose(0, 1) if batch_first else query
    reference_points = torch.rand(2, s, len(LEVELS), 2, dtype=F64)
    out = layer(query, reference_points=reference_points, spatial_shapes=shapes)
    expected = mmcv_msda_forward(
        state, (m, len(LEVELS), points), query, query, None, None, None, reference_points,
        shapes, batch_first,
    )  # fmt: skip
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_mmcv_attn_layer_init_and_arguments() -> None:
    layer = mmcv_layers.MultiScaleDeformableAttention(64, 4, 2, 3, dropout=0.25)
    reference = DeformAttn2d(64, 4, 2, 3)
    assert layer.embed_dims == 64
    assert not layer.batch_first  # mmcv's default
    assert layer.dropout.p == 0.25
    assert {k: v.shape for k, v in layer.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    torch.testing.assert_close(layer.sampling_offsets.bias, reference.sampling_offsets.bias)
    for parameter in layer.parameters():  # as mmdet's Xavier pass over the transformer
        nn.init.normal_(parameter)
    layer.init_weights()
    assert layer.sampling_offsets.weight.abs().max() == 0
    torch.testing.assert_close(layer.sampling_offsets.bias, reference.sampling_offsets.bias)
    assert layer.attention_weights.weight.abs().max() == 0
    with pytest.raises(ValueError, match=r"value_proj_ratio: only 1\.0 is supported"):
        mmcv_layers.MultiScaleDeformableAttention(64, value_proj_ratio=0.5)
    with pytest.raises(ValueError, match="reference_points, spatial_shapes: both are required"):
        layer(torch.randn(5, 1, 64))
