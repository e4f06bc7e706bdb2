"""Pure-PyTorch implementation of the operators: the numerical specification.

Every function here runs on any device and in any floating dtype, is differentiable by
autograd, and follows the operator contracts exactly (see the operator pages). Half-precision inputs are
computed in float32 and the results cast back, so that reductions accumulate in float32.

The sampling is written with vectorised gathers of the four bilinear corners (no Python
loop over pixels, kernel points or sampling points). Work is split into chunks (over the
batch for the convolution, over queries for the attention, over RoIs and their samples for
the RoI pooling) so that at most two buffers of the size (output pixels x kernel points x
channels) of one chunk are alive at a time (a gathered corner and the running sum), and a
chunk holds at most :data:`CHUNK_ELEMENTS` such elements. A corner outside the map reads
a zero appended to the values, never a value of the map.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

__all__ = [
    "CHUNK_ELEMENTS",
    "deform_conv2d",
    "deform_conv2d_backward",
    "deform_roi_pool",
    "deform_roi_pool_backward",
    "memory_format_of",
    "multi_scale_deformable_attention",
    "multi_scale_deformable_attention_backward",
]

CHUNK_ELEMENTS = 1 << 24
"""Largest number of sampled elements (pixels x points x channels) gathered in one chunk."""


def memory_format_of(input: Tensor) -> torch.memory_format:
    """``torch.channels_last`` for a channels-last 4-d tensor (that is not also plain
    contiguous), else ``torch.contiguous_format``: the layout an output should follow."""
    if input.is_contiguous() or not input.is_contiguous(memory_format=torch.channels_last):
        return torch.contiguous_format
    return torch.channels_last


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, the dtype itself otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _bilinear_corners(y: Tensor, x: Tensor, height: Tensor, width: Tensor):
    """Yield ``(flat_index, weight, inside)`` for the four bilinear corners of ``(y, x)``.

    ``flat_index`` is ``y_corner * width + x_corner`` (meaningless where the corner is
    outside the map), ``weight`` the interpolation weight (zero outside the map) and
    ``inside`` whether the corner is on the map. Callers read only the corners inside and
    point the others at a zero of their own (zero padding), so that a value they do not
    cover, even NaN or infinite, never reaches the result. A point at or beyond one pixel outside the map, or with a
    coordinate that is not finite, has no corner inside and zero gradient, as in the
    native kernels (``sampling.h``). ``height`` and ``width`` broadcast against ``y``.
    """
    on_map = (y > -1) & (y < height) & (x > -1) & (x < width)
    # A finite stand-in off the map, two pixels before it (all four corners outside), keeps
    # the weights, and so every gradient, finite.
    y = torch.where(on_map, y, -2.0)
    x = torch.where(on_map, x, -2.0)
    y0 = torch.floor(y)
    x0 = torch.floor(x)
    ly = y - y0
    lx = x - x0
    for dy, wy in ((0, 1 - ly), (1, ly)):
        yc = y0 + dy
        inside_y = (yc >= 0) & (yc <= height - 1)
        for dx, wx in ((0, 1 - lx), (1, lx)):
            xc = x0 + dx
            inside = inside_y & (xc >= 0) & (xc <= width - 1)
            yield (yc * width + xc).long(), wy * wx * inside, inside


def _zero_padded(values: Tensor, dim: int) -> Tensor:
    """``values`` with one more position of zeros at the end of ``dim``."""
    shape = list(values.shape)
    shape[dim] = 1
    return torch.cat([values, values.new_zeros(shape)], dim)


@contextlib.contextmanager
def _recording_autograd():
    """Record autograd even where the dispatcher has turned it off.

    The backward functions differentiate the forward by recomputation. Called from a
    ``torch.library`` operator, they run below the autograd dispatch key, where
    ``torch.enable_grad`` alone records nothing; this re-includes the autograd keys for
    the duration.
    """
    exclude = torch._C._dispatch_tls_local_exclude_set().remove(torch._C.DispatchKey.AutogradCPU)
    with (
        torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude),
        torch.enable_grad(),
    ):
        yield


def _chunks(total: int, per_item: int) -> list[slice]:
    """Slices of ``range(total)`` holding at most ``CHUNK_ELEMENTS // per_item`` items each."""
    step = max(1, CHUNK_ELEMENTS // max(1, per_item))
    return [slice(start, min(start + step, total)) for start in range(0, total, step)]


def _conv_columns(
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Tensor:
    """Bilinearly sampled, modulated columns ``[N, C_in, kh*kw, H_out*W_out]``."""
    n, c_in, height, width = input.shape
    kh, kw = kernel
    k = kh * kw
    h_out, w_out = offset.shape[-2:]
    groups = offset.shape[1] // (2 * k)
    dev, dt = input.device, input.dtype
    base_y = (torch.arange(h_out, device=dev, dtype=dt) * stride[0] - padding[0]).view(1, h_out, 1)
    base_x = (torch.arange(w_out, device=dev, dtype=dt) * stride[1] - padding[1]).view(1, 1, w_out)
    ky = (torch.arange(kh, device=dev, dtype=dt) * dilation[0]).repeat_interleave(kw)
    kx = (torch.arange(kw, device=dev, dtype=dt) * dilation[1]).repeat(kh)
    off = offset.reshape(n, groups, k, 2, h_out, w_out)
    y = ky.view(k, 1, 1) + base_y + off[:, :, :, 0]
    x = kx.view(k, 1, 1) + base_x + off[:, :, :, 1]
    points = k * h_out * w_out
    # Position height * width of each plane is a zero, read by the corners outside the map.
    values = _zero_padded(input.reshape(n, groups, c_in // groups, height * width), 3)
    columns = input.new_zeros(n, groups, c_in // groups, points)
    for index, weight, inside in _bilinear_corners(y, x, float(height), float(width)):
        index = torch.where(inside, index, height * width)
        gathered = torch.gather(
            values,
            3,
            index.reshape(n, groups, 1, points).expand(n, groups, c_in // groups, points),
        )
        columns.addcmul_(gathered, weight.reshape(n, groups, 1, points))
    if mask is not None:  # the mask scales the sample, as in the native kernels
        columns = columns * mask.reshape(n, groups, 1, points)
    return columns.view(n, c_in, k, h_out * w_out)


def _deform_conv2d_chunk(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    mask: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Tensor:
    """Deformable convolution of one batch chunk, without bias: ``[n, C_out, H_out, W_out]``."""
    c_out, c_per_group, kh, kw = weight.shape
    groups = input.shape[1] // c_per_group
    h_out, w_out = offset.shape[-2:]
    columns = _conv_columns(input, offset, mask, (kh, kw), stride, padding, dilation)
    columns = columns.view(input.shape[0], groups, c_per_group * kh * kw, h_out * w_out)
    out = torch.matmul(weight.reshape(groups, c_out // groups, c_per_group * kh * kw), columns)
    return out.view(input.shape[0], c_out, h_out, w_out)


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    mask: Tensor | None,
) -> Tensor:
    """Deformable convolution (DCN v1, or v2 with ``mask``), in pure PyTorch.

    Arguments are already validated (see :func:`deformops.deform_conv2d` for the contract);
    ``stride``, ``padding`` and ``dilation`` are pairs.

    Parameters
    ----------
    input : Tensor
        ``[N, C_in, H, W]``.
    offset : Tensor
        ``[N, 2*G*kh*kw, H_out, W_out]``, (dy, dx) pairs per kernel point.
    weight : Tensor
        ``[C_out, C_in/groups, kh, kw]``.
    bias : Tensor or None
        ``[C_out]``.
    stride : tuple of int
        ``(h, w)`` step between output pixels.
    padding : tuple of int
        ``(h, w)`` implicit zero padding.
    dilation : tuple of int
        ``(h, w)`` spacing between kernel points.
    mask : Tensor or None
        ``[N, G*kh*kw, H_out, W_out]`` modulation.

    Returns
    -------
    Tensor
        ``[N, C_out, H_out, W_out]`` in the dtype and memory format of ``input``.
    """
    cdt = _compute_dtype(input.dtype)
    n = input.shape[0]
    c_in = input.shape[1]
    kh, kw = weight.shape[-2:]
    h_out, w_out = offset.shape[-2:]
    w = weight.to(cdt)
    outs = [
        _deform_conv2d_chunk(
            input[part].to(cdt),
            offset[part].to(cdt),
            w,
            None if mask is None else mask[part].to(cdt),
            stride,
            padding,
            dilation,
        )
        for part in _chunks(n, c_in * kh * kw * h_out * w_out)
    ]
    out = torch.cat(outs) if outs else input.new_zeros(0, weight.shape[0], h_out, w_out, dtype=cdt)
    if bias is not None:
        out = out + bias.to(cdt).view(1, -1, 1, 1)
    return out.to(input.dtype).contiguous(memory_format=memory_format_of(input))


def deform_conv2d_backward(
    grad_output: Tensor,
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    mask: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Gradients of :func:`deform_conv2d` (without bias) by recomputation, chunk by chunk.

    Returns
    -------
    tuple
        ``(grad_input, grad_offset, grad_weight, grad_mask)``, each in its input's dtype;
        ``grad_mask`` is None when ``mask`` is None.
    """
    cdt = _compute_dtype(input.dtype)
    kh, kw = weight.shape[-2:]
    h_out, w_out = offset.shape[-2:]
    grad_input = torch.zeros_like(input, dtype=cdt)
    grad_offset = torch.zeros_like(offset, dtype=cdt)
    grad_mask = None if mask is None else torch.zeros_like(mask, dtype=cdt)
    grad_weight = torch.zeros_like(weight, dtype=cdt)
    w = weight.to(cdt)
    for part in _chunks(input.shape[0], input.shape[1] * kh * kw * h_out * w_out):
        with _recording_autograd():
            leaves = [
                t[part].detach().to(cdt).requires_grad_()
                for t in ((input, offset) if mask is None else (input, offset, mask))
            ]
            wl = w.detach().requires_grad_()
            out = _deform_conv2d_chunk(
                leaves[0],
                leaves[1],
                wl,
                leaves[2] if mask is not None else None,
                stride,
                padding,
                dilation,
            )
            grads = torch.autograd.grad(out, [*leaves, wl], grad_output[part].to(cdt))
        grad_input[part] = grads[0]
        grad_offset[part] = grads[1]
        if grad_mask is not None:
            grad_mask[part] = grads[2]
        grad_weight += grads[-1]
    return (
        grad_input.to(input.dtype),
        grad_offset.to(offset.dtype),
        grad_weight.to(weight.dtype),
        None if grad_mask is None else grad_mask.to(mask.dtype),
    )


def _msda_chunk(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention of one query chunk, ``[N, Q, M*D]``, compute dtype."""
    n, s, m, d = value.shape
    _, q, _, levels, points, _ = sampling_locations.shape
    cdt = value.dtype
    shapes = spatial_shapes.to(device=value.device, dtype=cdt)
    height = shapes[:, 0].view(1, 1, 1, levels, 1)
    width = shapes[:, 1].view(1, 1, 1, levels, 1)
    start = level_start_index.to(device=value.device).reshape(1, 1, 1, levels, 1)
    x = sampling_locations[..., 0].to(cdt) * width - 0.5
    y = sampling_locations[..., 1].to(cdt) * height - 0.5
    # [N, M, S + 1, D]: position S is a zero, read by the corners outside the map or the value.
    per_head = _zero_padded(value.permute(0, 2, 1, 3), 2)
    samples = q * levels * points
    sampled = value.new_zeros(n, m, samples, d)
    for index, weight, inside in _bilinear_corners(y, x, height, width):
        flat = index + start
        flat = torch.where(inside & (flat >= 0) & (flat < s), flat, s)
        flat = flat.permute(0, 2, 1, 3, 4).reshape(n, m, samples, 1).expand(n, m, samples, d)
        gathered = torch.gather(per_head, 2, flat)  # [N, M, Q*L*P, D]
        sampled.addcmul_(gathered, weight.permute(0, 2, 1, 3, 4).reshape(n, m, samples, 1))
    # Each sample times its attention weight, as in the native kernels.
    attn = attention_weights.to(cdt).permute(0, 2, 1, 3, 4).reshape(n * m * q, 1, levels * points)
    out = torch.bmm(attn, sampled.view(n * m * q, levels * points, d))
    return out.view(n, m, q, d).permute(0, 2, 1, 3).reshape(n, q, m * d)


def multi_scale_deformable_attention(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention (Deformable DETR), in pure PyTorch.

    Arguments are already validated (see :func:`deformops.multi_scale_deformable_attention`).

    Parameters
    ----------
    value : Tensor
        ``[N, S, M, D]``.
    spatial_shapes : Tensor
        ``[L, 2]`` int64, ``(H_l, W_l)``.
    level_start_index : Tensor
        ``[L]`` int64.
    sampling_locations : Tensor
        ``[N, Q, M, L, P, 2]`` normalised ``(x, y)``.
    attention_weights : Tensor
        ``[N, Q, M, L, P]``.

    Returns
    -------
    Tensor
        ``[N, Q, M*D]`` in the dtype of ``value``.
    """
    n, _, m, d = value.shape
    q, levels, points = (
        sampling_locations.shape[1],
        sampling_locations.shape[3],
        sampling_locations.shape[4],
    )
    cdt = _compute_dtype(value.dtype)
    v = value.to(cdt)
    outs = [
        _msda_chunk(
            v,
            spatial_shapes,
            level_start_index,
            sampling_locations[:, part],
            attention_weights[:, part],
        )
        for part in _chunks(q, n * m * levels * points * d)
    ]
    out = torch.cat(outs, dim=1) if outs else v.new_zeros(n, 0, m * d)
    return out.to(value.dtype)


def multi_scale_deformable_attention_backward(
    grad_output: Tensor,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`multi_scale_deformable_attention` by recomputation, chunk by chunk.

    Returns
    -------
    tuple
        ``(grad_value, grad_sampling_locations, grad_attention_weights)`` in their inputs' dtypes.
    """
    n, _, m, d = value.shape
    q, levels, points = (
        sampling_locations.shape[1],
        sampling_locations.shape[3],
        sampling_locations.shape[4],
    )
    cdt = _compute_dtype(value.dtype)
    grad_value = torch.zeros_like(value, dtype=cdt)
    grad_loc = torch.zeros_like(sampling_locations, dtype=_compute_dtype(sampling_locations.dtype))
    grad_attn = torch.zeros_like(attention_weights, dtype=_compute_dtype(attention_weights.dtype))
    v = value.detach().to(cdt)
    for part in _chunks(q, n * m * levels * points * d):
        with _recording_autograd():
            vl = v.requires_grad_()
            loc = sampling_locations[:, part].detach().to(grad_loc.dtype).requires_grad_()
            attn = attention_weights[:, part].detach().to(grad_attn.dtype).requires_grad_()
            out = _msda_chunk(vl, spatial_shapes, level_start_index, loc, attn)
            gv, gl, ga = torch.autograd.grad(out, [vl, loc, attn], grad_output[:, part].to(cdt))
        grad_value += gv
        grad_loc[:, part] = gl
        grad_attn[:, part] = ga
    return (
        grad_value.to(value.dtype),
        grad_loc.to(sampling_locations.dtype),
        grad_attn.to(attention_weights.dtype),
    )


def _roi_grid(
    rois: Tensor,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    batch: int,
    height: int,
    width: int,
) -> dict[str, Tensor]:
    """The sampling grid of each RoI (``roi_pool.h``): ``[K]`` tensors.

    ``start_y, start_x`` (top-left corner in input pixels), ``height, width`` (RoI size),
    ``bin_h, bin_w``, ``grid_h, grid_w`` (samples per bin side, int64, 0 for a skipped
    RoI), ``count`` (samples per bin, at least 1) and ``batch`` (int64, 0 for a skipped
    RoI). A RoI is skipped (its bins are zero) when its batch index is not in ``[0, N)``,
    its coordinates are not finite, or the map is empty.
    """
    scaled = rois[:, 1:] * spatial_scale - 0.5
    index = rois[:, 0]
    size = scaled[:, 2:] - scaled[:, :2]
    valid = (index >= 0) & (index < batch) & torch.isfinite(size).all(1)
    valid &= height > 0 and width > 0
    # A skipped RoI samples nothing; zeros keep its (unused) geometry finite.
    scaled = torch.where(valid[:, None], scaled, torch.zeros_like(scaled))
    start_x, start_y, end_x, end_y = scaled.unbind(1)
    roi_w = end_x - start_x
    roi_h = end_y - start_y

    def samples(extent: Tensor, bins: int) -> Tensor:
        if sampling_ratio > 0:
            per_side = torch.full_like(extent, sampling_ratio)
        else:
            per_side = torch.ceil(extent / bins).clamp(0, 1 << 30)
        return torch.where(valid, per_side, torch.zeros_like(per_side)).long()

    grid_h = samples(roi_h, output_size[0])
    grid_w = samples(roi_w, output_size[1])
    return {
        "start_y": start_y,
        "start_x": start_x,
        "height": roi_h,
        "width": roi_w,
        "bin_h": roi_h / output_size[0],
        "bin_w": roi_w / output_size[1],
        "grid_h": grid_h,
        "grid_w": grid_w,
        "count": (grid_h * grid_w).clamp_min(1).to(rois.dtype),
        "batch": torch.where(valid, index, torch.zeros_like(index)).long(),
    }


def _roi_align_coordinate(v: Tensor, size: int) -> Tensor:
    """RoIAlign's border rule along one axis: ``v`` moved into ``[0, size - 1]``, with a
    gradient only where it is not moved (``0 <= v < size - 1``), as ``sampling.h``."""
    free = (v >= 0) & (v < size - 1)
    return torch.where(free, v, torch.where(v < 0, 0.0, float(size - 1)).to(v.dtype))


def _roi_pool_chunk(
    values: Tensor,
    shape: tuple[int, int, int],
    rois: Tensor,
    offset: Tensor | None,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    gamma: float,
) -> Tensor:
    """Deformable RoI pooling of one chunk of RoIs, ``[k, C, out_h, out_w]``.

    ``values`` is the input as ``[N*H*W + 1, C]`` (``_roi_values``) in the compute dtype,
    ``shape`` its ``(N, H, W)``; ``rois`` and ``offset`` are in the compute dtype.
    """
    batch, height, width = shape
    channels = values.shape[1]
    k = rois.shape[0]
    oh, ow = output_size
    grid = _roi_grid(rois, output_size, spatial_scale, sampling_ratio, batch, height, width)
    out = values.new_zeros(k, oh, ow, channels)
    if k == 0 or height * width == 0:
        return out.permute(0, 3, 1, 2)
    gh, gw = int(grid["grid_h"].max()), int(grid["grid_w"].max())
    dev, dt = values.device, values.dtype

    def per_roi(name: str) -> Tensor:
        return grid[name].view(k, 1, 1, 1)

    start_y, start_x = per_roi("start_y"), per_roi("start_x")
    if offset is not None:
        start_y = start_y + (gamma * per_roi("height")) * offset[:, 1, :, :, None]
        start_x = start_x + (gamma * per_roi("width")) * offset[:, 0, :, :, None]
    ph = torch.arange(oh, device=dev, dtype=dt).view(1, oh, 1, 1)
    pw = torch.arange(ow, device=dev, dtype=dt).view(1, 1, ow, 1)
    image = (per_roi("batch") * (height * width)).view(k, 1)
    for part in _chunks(gh * gw, k * oh * ow * channels):
        sample = torch.arange(part.start, part.stop, device=dev)
        iy, ix = (sample // gw).view(1, 1, 1, -1), (sample % gw).view(1, 1, 1, -1)
        used = (iy < per_roi("grid_h")) & (ix < per_roi("grid_w"))
        grid_h = per_roi("grid_h").clamp_min(1).to(dt)
        grid_w = per_roi("grid_w").clamp_min(1).to(dt)
        y = start_y + ph * per_roi("bin_h") + (iy.to(dt) + 0.5) * per_roi("bin_h") / grid_h
        x = start_x + pw * per_roi("bin_w") + (ix.to(dt) + 0.5) * per_roi("bin_w") / grid_w
        y, x = torch.broadcast_tensors(y, x)  # [k, out_h, out_w, samples of the chunk]
        used = used & (y >= -1) & (y <= height) & (x >= -1) & (x <= width)
        y = _roi_align_coordinate(y, height)
        x = _roi_align_coordinate(x, width)
        samples = y.shape[1:].numel()
        for index, weight, inside in _bilinear_corners(y, x, float(height), float(width)):
            read = (inside & used).reshape(k, samples)
            flat = torch.where(read, image + index.reshape(k, samples), batch * height * width)
            gathered = values.index_select(0, flat.reshape(-1)).view(k, oh, ow, -1, channels)
            coeff = (weight * used).view(k, oh, ow, -1, 1)
            out = out + (gathered * coeff).sum(3)
    out = out / grid["count"].view(k, 1, 1, 1)
    return out.permute(0, 3, 1, 2)


def _roi_values(input: Tensor, cdt: torch.dtype) -> Tensor:
    """The input ``[N, C, H, W]`` as ``[N*H*W + 1, C]`` rows of channels, in ``cdt``: the
    last row is zeros, read by the corners outside the map and the samples not taken."""
    return _zero_padded(input.to(cdt).permute(0, 2, 3, 1).reshape(-1, input.shape[1]), 0)


def _roi_chunks(
    input: Tensor,
    rois: Tensor,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
) -> list[slice]:
    """Chunks of RoIs whose samples (bins x channels x the most samples of a bin of any
    RoI) fit in :data:`CHUNK_ELEMENTS`; a chunk of one RoI may still have to split its
    samples (``_roi_pool_chunk`` does)."""
    n, c, h, w = input.shape
    grid = _roi_grid(rois, output_size, spatial_scale, sampling_ratio, n, h, w)
    most = int((grid["grid_h"] * grid["grid_w"]).max()) if rois.shape[0] else 0
    return _chunks(rois.shape[0], c * output_size[0] * output_size[1] * max(1, most))


def deform_roi_pool(
    input: Tensor,
    rois: Tensor,
    offset: Tensor | None,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    gamma: float,
) -> Tensor:
    """Deformable RoI pooling (mmcv's ``DeformRoIPool``), in pure PyTorch.

    Arguments are already validated (see :func:`deformops.deform_roi_pool` for the
    contract); ``output_size`` is a pair.

    Parameters
    ----------
    input : Tensor
        ``[N, C, H, W]``.
    rois : Tensor
        ``[K, 5]`` rows ``(batch index, x1, y1, x2, y2)``; a RoI whose batch index is not
        in ``[0, N)`` pools zeros.
    offset : Tensor or None
        ``[K, 2, out_h, out_w]``: channel 0 moves the bins along x, channel 1 along y, in
        units of ``gamma`` times the RoI's width and height.
    output_size : tuple of int
        ``(out_h, out_w)``.
    spatial_scale : float
        Input pixels per RoI coordinate unit.
    sampling_ratio : int
        Samples per bin side; ``<= 0``: ``ceil(RoI side / bins)`` for each RoI.
    gamma : float
        Scale of the offsets.

    Returns
    -------
    Tensor
        ``[K, C, out_h, out_w]``, contiguous, in the dtype of ``input``.
    """
    cdt = _compute_dtype(input.dtype)
    n, c, h, w = input.shape
    values = _roi_values(input, cdt)
    r = rois.to(cdt)
    o = None if offset is None else offset.to(cdt)
    parts = _roi_chunks(input, r, output_size, spatial_scale, sampling_ratio)
    outs = [
        _roi_pool_chunk(
            values,
            (n, h, w),
            r[part],
            None if o is None else o[part],
            output_size,
            spatial_scale,
            sampling_ratio,
            gamma,
        )
        for part in parts
    ]
    out = torch.cat(outs) if outs else input.new_zeros(0, c, *output_size, dtype=cdt)
    return out.to(input.dtype).contiguous()


def deform_roi_pool_backward(
    grad_output: Tensor,
    input: Tensor,
    rois: Tensor,
    offset: Tensor | None,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    gamma: float,
) -> tuple[Tensor, Tensor | None]:
    """Gradients of :func:`deform_roi_pool` by recomputation, chunk by chunk of RoIs.

    Returns
    -------
    tuple
        ``(grad_input, grad_offset)``: ``grad_input`` in the dtype and memory format of
        ``input``, ``grad_offset`` in the dtype of ``offset`` (None when ``offset`` is None).
    """
    cdt = _compute_dtype(input.dtype)
    n, c, h, w = input.shape
    r = rois.detach().to(cdt)
    grad_values = torch.zeros(n * h * w + 1, c, dtype=cdt, device=input.device)
    grad_offset = None if offset is None else torch.zeros_like(offset, dtype=cdt)
    values = _roi_values(input.detach(), cdt).detach()
    for part in _roi_chunks(input, r, output_size, spatial_scale, sampling_ratio):
        with _recording_autograd():
            leaves = [values.requires_grad_()]
            if offset is not None:
                leaves.append(offset[part].detach().to(cdt).requires_grad_())
            out = _roi_pool_chunk(
                leaves[0],
                (n, h, w),
                r[part],
                leaves[1] if offset is not None else None,
                output_size,
                spatial_scale,
                sampling_ratio,
                gamma,
            )
            if not out.requires_grad:  # no sample (empty RoIs or map): zero gradients
                continue
            grads = torch.autograd.grad(
                out, leaves, grad_output[part].to(cdt), allow_unused=True, materialize_grads=True
            )
        grad_values += grads[0]
        if grad_offset is not None:
            grad_offset[part] = grads[1]
    grad_input = grad_values[:-1].view(n, h, w, c).permute(0, 3, 1, 2).to(input.dtype)
    return (
        grad_input.contiguous(memory_format=memory_format_of(input)),
        None if grad_offset is None else grad_offset.to(offset.dtype),
    )
