"""Independent float64 formulations of the deformops operators: the tests' ground truth.

Written from the papers and the contracts in DESIGN.md, not from ``deformops.reference``:
explicit gathers of the four bilinear corners, each with its own validity test, and plain
loops over kernel points, levels and offset groups (pixels and points are vectorised with
indexing). Every function is differentiable by autograd, so its gradients are the float64
ground truth for all inputs.

Sampling convention (torchvision and Deformable DETR): pixel centres are at integer
coordinates; a corner outside the map contributes zero; a location at or beyond one pixel
outside the map samples zero and has zero gradient. Derivatives at integer coordinates are
those of the ``floor`` split (the right derivative).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

Pair = int | tuple[int, int]


def _pair(value: Pair) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _check_float64(**tensors: Tensor | None) -> None:
    for name, tensor in tensors.items():
        if tensor is not None and tensor.dtype != torch.float64:
            raise TypeError(f"naive: {name} must be float64, got {tensor.dtype}")


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """Relative error in the Frobenius norm, computed in float64.

    Parameters
    ----------
    actual, expected : Tensor
        Same shape, any floating dtype.

    Returns
    -------
    float
        ``||actual - expected|| / ||expected||`` (the absolute norm when ``expected`` is 0).
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    diff = torch.linalg.vector_norm(a - e).item()
    scale = torch.linalg.vector_norm(e).item()
    return diff / scale if scale > 0 else diff


def bilinear(feature: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """Bilinear samples of ``feature`` at pixel coordinates, zero padding.

    Parameters
    ----------
    feature : Tensor
        ``[B, C, H, W]``.
    y, x : Tensor
        ``[B, *points]`` row and column coordinates in pixels (pixel centres are integers).

    Returns
    -------
    Tensor
        ``[B, C, *points]``.
    """
    b, c, h, w = feature.shape
    points = y.shape[1:]
    y = y.reshape(b, -1)
    x = x.reshape(b, -1)
    flat = feature.reshape(b, c, h * w)
    inside = (y > -1) & (y < h) & (x > -1) & (x < w)
    y0 = torch.floor(y).detach()
    x0 = torch.floor(x).detach()
    ly = y - y0
    lx = x - x0
    out = torch.zeros(b, c, y.shape[1], dtype=feature.dtype, device=feature.device)
    for dy, wy in ((0, 1 - ly), (1, ly)):
        for dx, wx in ((0, 1 - lx), (1, lx)):
            yi = torch.where(inside, y0 + dy, 0).long()
            xi = torch.where(inside, x0 + dx, 0).long()
            valid = inside & (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
            index = yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)
            corner = torch.gather(flat, 2, index[:, None, :].expand(b, c, -1))
            out = out + corner * (wy * wx * valid)[:, None, :]
    return out.reshape(b, c, *points)


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: Pair = 1,
    padding: Pair = 0,
    dilation: Pair = 1,
    mask: Tensor | None = None,
) -> Tensor:
    """Deformable convolution v1/v2 (torchvision contract), float64.

    Parameters
    ----------
    input : Tensor
        ``[N, C_in, H, W]``.
    offset : Tensor
        ``[N, 2*G*kh*kw, H_out, W_out]``; channel ``g*2*K + 2*k`` is dy, ``+1`` is dx.
    weight : Tensor
        ``[C_out, C_in/groups, kh, kw]``.
    bias : Tensor, optional
        ``[C_out]``.
    stride, padding, dilation : int or (int, int)
    mask : Tensor, optional
        ``[N, G*kh*kw, H_out, W_out]``.

    Returns
    -------
    Tensor
        ``[N, C_out, H_out, W_out]``.
    """
    _check_float64(input=input, offset=offset, weight=weight, bias=bias, mask=mask)
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    n, c_in, _, _ = input.shape
    c_out, c_per_group, kh, kw = weight.shape
    k_points = kh * kw
    groups = c_in // c_per_group
    offset_groups = offset.shape[1] // (2 * k_points)
    c_per_offset_group = c_in // offset_groups
    h_out, w_out = offset.shape[2:]
    base_y = (torch.arange(h_out, dtype=torch.float64) * sh - ph)[:, None]
    base_x = (torch.arange(w_out, dtype=torch.float64) * sw - pw)[None, :]

    group_columns = []
    for g in range(offset_groups):
        channels = input[:, g * c_per_offset_group : (g + 1) * c_per_offset_group]
        samples = []
        for i in range(kh):
            for j in range(kw):
                k = i * kw + j
                dy = offset[:, g * 2 * k_points + 2 * k]
                dx = offset[:, g * 2 * k_points + 2 * k + 1]
                sample = bilinear(channels, base_y + i * dh + dy, base_x + j * dw + dx)
                if mask is not None:
                    sample = sample * mask[:, g * k_points + k][:, None]
                samples.append(sample)
        group_columns.append(torch.stack(samples, dim=2))
    columns = torch.cat(group_columns, dim=1)  # [N, C_in, K, H_out, W_out]

    c_out_per_group = c_out // groups
    outputs = []
    for g in range(groups):
        cols = columns[:, g * c_per_group : (g + 1) * c_per_group]
        w = weight[g * c_out_per_group : (g + 1) * c_out_per_group].reshape(
            c_out_per_group, c_per_group, k_points
        )
        outputs.append(torch.einsum("nckhw,ock->nohw", cols, w))
    out = torch.cat(outputs, dim=1) if outputs else columns.new_zeros(n, 0, h_out, w_out)
    if bias is not None:
        out = out + bias[None, :, None, None]
    return out


def multi_scale_deformable_attention(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention (Deformable DETR contract), float64.

    Parameters
    ----------
    value : Tensor
        ``[N, S, M, D]``.
    spatial_shapes : Tensor
        ``[L, 2]`` int64, rows ``(H_l, W_l)``.
    level_start_index : Tensor
        ``[L]`` int64.
    sampling_locations : Tensor
        ``[N, Q, M, L, P, 2]`` normalised ``(x, y)``; pixel ``x*W_l - 0.5``, ``y*H_l - 0.5``.
    attention_weights : Tensor
        ``[N, Q, M, L, P]``.

    Returns
    -------
    Tensor
        ``[N, Q, M*D]``.
    """
    _check_float64(
        value=value, sampling_locations=sampling_locations, attention_weights=attention_weights
    )
    n, _, m, d = value.shape
    q, levels, p = (
        sampling_locations.shape[1],
        sampling_locations.shape[3],
        sampling_locations.shape[4],
    )
    out = torch.zeros(n * m, d, q, p, dtype=torch.float64, device=value.device)
    for level in range(levels):
        h, w = (int(v) for v in spatial_shapes[level])
        start = int(level_start_index[level])
        feature = value[:, start : start + h * w].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        loc = sampling_locations[:, :, :, level].permute(0, 2, 1, 3, 4).reshape(n * m, q, p, 2)
        samples = bilinear(feature, loc[..., 1] * h - 0.5, loc[..., 0] * w - 0.5)
        weights = attention_weights[:, :, :, level].permute(0, 2, 1, 3).reshape(n * m, 1, q, p)
        out = out + samples * weights
    return out.sum(-1).reshape(n, m, d, q).permute(0, 3, 1, 2).reshape(n, q, m * d)


def deform_attn2d(
    state: Mapping[str, Tensor],
    num_heads: int,
    num_levels: int,
    num_points: int,
    query: Tensor,
    reference_points: Tensor,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    padding_mask: Tensor | None = None,
) -> Tensor:
    """Deformable DETR's ``MSDeformAttn.forward`` from a state dict, float64.

    Parameters
    ----------
    state : Mapping[str, Tensor]
        ``sampling_offsets``, ``attention_weights``, ``value_proj``, ``output_proj``
        ``.weight`` / ``.bias`` (converted to float64 here).
    num_heads, num_levels, num_points : int
    query : Tensor
        ``[N, Q, C]``.
    reference_points : Tensor
        ``[N, Q, L, 2]`` normalised points or ``[N, Q, L, 4]`` boxes ``(cx, cy, w, h)``.
    value : Tensor
        ``[N, S, C]`` flattened levels.
    spatial_shapes, level_start_index : Tensor
        ``[L, 2]`` and ``[L]`` int64.
    padding_mask : Tensor, optional
        ``[N, S]`` bool, True where padded.

    Returns
    -------
    Tensor
        ``[N, Q, C]``.
    """
    p = {k: v.detach().to(torch.float64) for k, v in state.items()}
    _check_float64(query=query, reference_points=reference_points, value=value)
    n, q, c = query.shape
    s = value.shape[1]
    m, lv, pt = num_heads, num_levels, num_points

    def linear(name: str, x: Tensor) -> Tensor:
        return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]

    v = linear("value_proj", value)
    if padding_mask is not None:
        v = v.masked_fill(padding_mask[..., None], 0.0)
    v = v.reshape(n, s, m, c // m)
    offsets = linear("sampling_offsets", query).reshape(n, q, m, lv, pt, 2)
    logits = linear("attention_weights", query).reshape(n, q, m, lv * pt)
    weights = torch.softmax(logits, -1).reshape(n, q, m, lv, pt)
    if reference_points.shape[-1] == 2:
        normalizer = torch.stack([spatial_shapes[:, 1], spatial_shapes[:, 0]], -1).to(torch.float64)
        locations = (
            reference_points[:, :, None, :, None, :]
            + offsets / normalizer[None, None, None, :, None, :]
        )
    else:
        locations = (
            reference_points[:, :, None, :, None, :2]
            + offsets / pt * reference_points[:, :, None, :, None, 2:] * 0.5
        )
    out = multi_scale_deformable_attention(v, spatial_shapes, level_start_index, locations, weights)
    return linear("output_proj", out)


def deform_attn2d_offset_bias(num_heads: int, num_levels: int, num_points: int) -> Tensor:
    """Deformable DETR's ``sampling_offsets.bias`` initialisation.

    Head ``h`` points in direction ``2*pi*h/num_heads``, scaled so that the larger of
    ``|cos|, |sin|`` is 1 (a square ring), and point ``i`` lies on ring ``i + 1``.

    Returns
    -------
    Tensor
        ``[num_heads * num_levels * num_points * 2]`` float64.
    """
    rows = []
    for h in range(num_heads):
        theta = 2.0 * math.pi * h / num_heads
        direction = (math.cos(theta), math.sin(theta))
        scale = max(abs(direction[0]), abs(direction[1]))
        for _ in range(num_levels):
            for i in range(num_points):
                rows.append([direction[0] / scale * (i + 1), direction[1] / scale * (i + 1)])
    return torch.tensor(rows, dtype=torch.float64).reshape(-1)


def flatten_levels(maps: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Flattens ``L`` maps ``[N, C, H_l, W_l]`` into Deformable DETR's layout.

    Returns
    -------
    tuple of Tensor
        value ``[N, S, C]``, spatial_shapes ``[L, 2]`` int64, level_start_index ``[L]`` int64.
    """
    value = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)
    shapes = torch.tensor([list(m.shape[2:]) for m in maps], dtype=torch.int64)
    sizes = [int(h) * int(w) for h, w in shapes.tolist()]
    starts = torch.tensor([sum(sizes[:i]) for i in range(len(sizes))], dtype=torch.int64)
    return value, shapes, starts


def _roi_align_sample(feature: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """RoIAlign's bilinear sample of ``feature`` ``[C, H, W]`` at ``(y, x)`` (any shape).

    Written after torchvision's ``roi_align`` kernel: a point with ``y < -1``, ``y > H``,
    ``x < -1`` or ``x > W`` reads 0; otherwise ``y < 0`` reads row 0, a point whose row
    ``floor(y)`` is ``H - 1`` or more reads row ``H - 1`` (columns alike), and the value is
    interpolated between rows ``y_low`` and ``y_high = min(y_low + 1, H - 1)``. A moved
    coordinate is a constant (zero derivative); others have the floor split's right
    derivative.
    """
    c, h, w = feature.shape
    inside = (y >= -1) & (y <= h) & (x >= -1) & (x <= w)
    y = torch.where(y < 0, torch.zeros_like(y), y)
    x = torch.where(x < 0, torch.zeros_like(x), x)
    y_low = torch.floor(y).detach()
    x_low = torch.floor(x).detach()
    y_last = y_low >= h - 1
    x_last = x_low >= w - 1
    y = torch.where(y_last, torch.full_like(y, h - 1), y)
    x = torch.where(x_last, torch.full_like(x, w - 1), x)
    y_low = torch.where(y_last, torch.full_like(y_low, h - 1), y_low)
    x_low = torch.where(x_last, torch.full_like(x_low, w - 1), x_low)
    y_high = torch.where(y_last, y_low, y_low + 1)
    x_high = torch.where(x_last, x_low, x_low + 1)
    ly = y - y_low
    lx = x - x_low
    flat = feature.reshape(c, h * w)

    def at(row: Tensor, col: Tensor) -> Tensor:
        index = (row * w + col).long().reshape(-1)
        return flat[:, index].reshape(c, *row.shape)

    value = (
        at(y_low, x_low) * ((1 - ly) * (1 - lx))
        + at(y_low, x_high) * ((1 - ly) * lx)
        + at(y_high, x_low) * (ly * (1 - lx))
        + at(y_high, x_high) * (ly * lx)
    )
    return value * inside


def deform_roi_pool(
    input: Tensor,
    rois: Tensor,
    offset: Tensor | None = None,
    output_size: Pair = 7,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
) -> Tensor:
    """Deformable RoI pooling (mmcv's ``DeformRoIPool`` contract), float64, one RoI at a time.

    RoI ``(b, x1, y1, x2, y2)`` covers ``[x1*s - 0.5, x2*s - 0.5] x [y1*s - 0.5, y2*s - 0.5]``
    (``s`` the spatial scale), split into ``out_h x out_w`` bins; bin ``(ph, pw)`` is moved
    by ``gamma * (roi_w * offset[k, 0, ph, pw], roi_h * offset[k, 1, ph, pw])`` and averages
    ``g_h x g_w`` RoIAlign samples at the centres of its sub-cells, where ``g`` is
    ``sampling_ratio`` or ``ceil(roi side / bins)``. A RoI with a batch index outside
    ``[0, N)`` pools zeros.

    Parameters
    ----------
    input : Tensor
        ``[N, C, H, W]``.
    rois : Tensor
        ``[K, 5]``.
    offset : Tensor, optional
        ``[K, 2, out_h, out_w]``.
    output_size : int or (int, int)
    spatial_scale, sampling_ratio, gamma : as in ``deformops.deform_roi_pool``.

    Returns
    -------
    Tensor
        ``[K, C, out_h, out_w]``.
    """
    _check_float64(input=input, rois=rois, offset=offset)
    oh, ow = _pair(output_size)
    n, c, h, w = input.shape
    outputs = []
    for k in range(rois.shape[0]):
        b = float(rois[k, 0])
        x1, y1, x2, y2 = (float(v) * spatial_scale - 0.5 for v in rois[k, 1:])
        roi_w, roi_h = x2 - x1, y2 - y1
        g_h = sampling_ratio if sampling_ratio > 0 else max(0, math.ceil(roi_h / oh))
        g_w = sampling_ratio if sampling_ratio > 0 else max(0, math.ceil(roi_w / ow))
        if not 0 <= b < n or h * w == 0 or g_h * g_w == 0:
            outputs.append(input.new_zeros(c, oh, ow))
            continue
        bin_h, bin_w = roi_h / oh, roi_w / ow
        start_y = torch.full((oh, ow), y1, dtype=torch.float64)
        start_x = torch.full((oh, ow), x1, dtype=torch.float64)
        if offset is not None:
            start_y = start_y + gamma * roi_h * offset[k, 1]
            start_x = start_x + gamma * roi_w * offset[k, 0]
        ph = torch.arange(oh, dtype=torch.float64)[:, None, None, None]
        pw = torch.arange(ow, dtype=torch.float64)[None, :, None, None]
        iy = torch.arange(g_h, dtype=torch.float64)[None, None, :, None]
        ix = torch.arange(g_w, dtype=torch.float64)[None, None, None, :]
        y = start_y[:, :, None, None] + ph * bin_h + (iy + 0.5) * bin_h / g_h
        x = start_x[:, :, None, None] + pw * bin_w + (ix + 0.5) * bin_w / g_w
        y, x = torch.broadcast_tensors(y, x)
        samples = _roi_align_sample(input[int(b)], y, x)  # [C, oh, ow, g_h, g_w]
        outputs.append(samples.sum((-2, -1)) / (g_h * g_w))
    if not outputs:
        return input.new_zeros(0, c, oh, ow)
    return torch.stack(outputs)
