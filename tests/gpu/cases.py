"""Random inputs of the operators on a CUDA device, shared by the GPU tests and the
compute-sanitizer script."""

from __future__ import annotations

import torch
from torch import Tensor

# (levels (H_l, W_l), Q, M, D, P): D covers 1, 12, 32, 48, 64, 256.
MSDA_CASES = [
    (((5, 7), (3, 2), (1, 1)), 9, 3, 1, 2),
    (((6, 6), (3, 3)), 13, 2, 12, 4),
    (((16, 12), (8, 6), (4, 3), (2, 2)), 33, 8, 32, 4),
    (((9, 11),), 7, 4, 48, 3),
    (((8, 8), (4, 4)), 17, 2, 64, 5),
    (((4, 5), (2, 3)), 5, 1, 256, 2),
    (((6, 5), (3, 3), (2, 2)), 11, 2, 32, 4),
]

# (N, C_in, C_out, H, W, (kh, kw), stride, padding, dilation, groups, offset_groups, mask, bias)
CONV_CASES = [
    (2, 4, 6, 5, 7, (3, 3), 1, 1, 1, 1, 1, True, True),
    (1, 6, 6, 1, 1, (1, 1), 1, 0, 1, 3, 2, False, False),
    (2, 8, 4, 9, 11, (3, 5), 2, (1, 2), 2, 1, 4, True, False),
    (3, 12, 9, 6, 6, (3, 3), 1, 2, 2, 3, 4, False, True),
]

# (N, C, H, W, K, output_size, spatial_scale, sampling_ratio, gamma, offset)
ROI_CASES = [
    (2, 4, 9, 11, 13, (3, 4), 0.5, 0, 0.3, True),
    (1, 1, 1, 1, 3, 1, 1.0, 2, 0.1, True),
    (2, 64, 16, 12, 37, 7, 0.25, 0, 0.1, False),
    (3, 256, 8, 8, 20, (7, 5), 1.0, 2, 1.0, True),
]


def msda_inputs(case, device: str, dtype: torch.dtype, loc_dtype: torch.dtype | None = None):
    """``(value, spatial_shapes, level_start_index, locations, weights)``; locations reach
    up to 0.3 outside [0, 1] so that some samples fall off the map."""
    levels, q, m, d, p = case
    shapes = torch.tensor(levels, device=device)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    n, s, n_levels = 2, int(sizes.sum()), len(levels)
    loc_dtype = loc_dtype or dtype
    value = torch.randn(n, s, m, d, device=device, dtype=dtype)
    loc = (torch.rand(n, q, m, n_levels, p, 2, device=device) * 1.6 - 0.3).to(loc_dtype)
    weights = torch.rand(n, q, m, n_levels, p, device=device).softmax(-1).to(loc_dtype)
    return value, shapes, starts, loc, weights


def off_pair_alignment(t: Tensor) -> Tensor:
    """A contiguous copy of ``t`` one element into a fresh storage, so that its first
    element is not aligned to two elements (locations then take per-element loads)."""
    shifted = torch.empty(t.numel() + 1, device=t.device, dtype=t.dtype)[1:].view_as(t)
    shifted.copy_(t)
    assert shifted.data_ptr() % (2 * t.element_size()) != 0
    return shifted


def msda_non_finite_inputs(dtype: torch.dtype):
    """``msda_inputs`` of MSDA_CASES[2] on CUDA with NaN and infinite attention weights in
    image 0 (image 1 all finite)."""
    value, shapes, starts, loc, weights = msda_inputs(MSDA_CASES[2], "cuda", dtype)
    weights[0, :, :, 0, 0] = float("nan")
    weights[0, :, :, 1, 0] = float("inf")
    return value, shapes, starts, loc, weights


def conv_inputs(case, device: str, dtype: torch.dtype) -> dict[str, Tensor | int | None]:
    """Keyword arguments of ``deformops.deform_conv2d`` with offsets of 2 pixels' spread."""
    n, c_in, c_out, h, w, (kh, kw), stride, padding, dilation, groups, og, mask, bias = case
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    h_out = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    w_out = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    k = kh * kw

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, device=device).to(dtype)

    return {
        "input": rand(n, c_in, h, w),
        "offset": 2 * rand(n, 2 * og * k, h_out, w_out),
        "weight": rand(c_out, c_in // groups, kh, kw),
        "bias": rand(c_out) if bias else None,
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "mask": torch.rand(n, og * k, h_out, w_out, device=device).to(dtype) if mask else None,
    }


def roi_inputs(
    case, device: str, dtype: torch.dtype, coordinate_dtype: torch.dtype | None = None
) -> dict[str, Tensor | int | float | tuple[int, int] | None]:
    """Keyword arguments of ``deformops.deform_roi_pool``: boxes of the image (the map
    times ``1 / spatial_scale``) that start up to 30% outside it and measure up to 80% of
    it (one in four with x2 < x1: empty), offsets ``randn``; the RoIs and offsets in
    ``coordinate_dtype`` (default ``dtype``)."""
    n, c, h, w, k, output_size, spatial_scale, sampling_ratio, gamma, offset = case
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
    coordinate_dtype = coordinate_dtype or dtype
    extent = torch.tensor([w, h], device=device) / spatial_scale
    corner = (torch.rand(k, 2, device=device) * 1.4 - 0.3) * extent
    size = torch.rand(k, 2, device=device) * 0.8 * extent
    size[::4, 0] *= -0.25
    batch = torch.randint(0, n, (k, 1), device=device).float()
    rois = torch.cat([batch, corner, corner + size], 1)
    return {
        "input": torch.randn(n, c, h, w, device=device).to(dtype),
        "rois": rois.to(coordinate_dtype),
        "offset": torch.randn(k, 2, oh, ow, device=device).to(coordinate_dtype) if offset else None,
        "output_size": (oh, ow),
        "spatial_scale": spatial_scale,
        "sampling_ratio": sampling_ratio,
        "gamma": gamma,
    }
