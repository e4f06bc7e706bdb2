"""Public functions: argument checks with clear errors, then the operators of :mod:`deformops.ops`.

Every bad argument raises before any kernel runs: :class:`TypeError` for a wrong type or
dtype, :class:`ValueError` for a wrong shape, size, value or device; each message names
the argument, the shape or value it got and what was expected.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _autocast, ops

__all__ = ["deform_conv2d", "deform_roi_pool", "multi_scale_deformable_attention"]

IntPair = int | tuple[int, int] | Sequence[int]


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_floating(name: str, t: object, ndim: int, expected: str) -> Tensor:
    """Check that ``t`` is a floating tensor of rank ``ndim``; ``expected`` describes its shape."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a tensor {expected}, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor {expected}, got dtype {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d tensor {expected}, got shape {_shape(t)}")
    return t


def _check_shape(name: str, t: Tensor, expected: tuple[int, ...], description: str) -> None:
    """Check ``t``'s shape; ``description`` is a constant (formatting sizes would make
    ``torch.compile`` specialise them)."""
    if _shape(t) != expected:
        raise ValueError(f"{name}: expected shape {expected} {description}, got {_shape(t)}")


def _check_same(name: str, t: Tensor, like: Tensor, like_name: str, dtypes: tuple) -> None:
    """Check that ``t`` is on ``like``'s device and has one of ``dtypes``."""
    if t.device != like.device:
        raise ValueError(
            f"{name}: expected a tensor on {like_name}'s device {like.device}, got {t.device}"
        )
    if t.dtype not in dtypes:
        allowed = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name}: expected dtype {allowed} (as {like_name}), got {t.dtype}")


def _pair(name: str, value: IntPair, minimum: int) -> tuple[int, int]:
    """An ``int`` or a pair of ``int`` as a pair, each at least ``minimum``."""
    pair = (value, value) if isinstance(value, int) else value
    if (
        not isinstance(pair, Sequence)
        or len(pair) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
    ):
        raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name}: expected values >= {minimum}, got {value!r}")
    return pair[0], pair[1]


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    mask: Tensor | None = None,
) -> Tensor:
    """Deformable convolution (DCN v1; v2 with ``mask``), as ``torchvision.ops.deform_conv2d``.

    Kernel point ``k = i*kw + j`` of output pixel ``(ho, wo)`` samples the input bilinearly
    (zero outside the map) at ``y = ho*sh - ph + i*dh + dy`` and
    ``x = wo*sw - pw + j*dw + dx``, where ``(dy, dx)`` are offset channels
    ``g*2*K + 2*k`` and ``g*2*K + 2*k + 1`` of the input channel's offset group ``g``,
    multiplies the sample by the mask (if any), and contracts samples with ``weight``.

    Parameters
    ----------
    input : Tensor
        ``[N, C_in, H, W]``, contiguous or channels_last.
    offset : Tensor
        ``[N, 2*G*kh*kw, H_out, W_out]``; ``G`` offset groups, ``G`` divides ``C_in``.
    weight : Tensor
        ``[C_out, C_in/groups, kh, kw]``; ``groups = C_in / weight.shape[1]``.
    bias : Tensor, optional
        ``[C_out]``.
    stride : int or (int, int)
        Step between output pixels, as in :func:`torch.nn.functional.conv2d`.
    padding : int or (int, int)
        Implicit zero padding on each side.
    dilation : int or (int, int)
        Spacing between kernel points.
    mask : Tensor, optional
        ``[N, G*kh*kw, H_out, W_out]`` modulation scalars (DCN v2).

    Returns
    -------
    Tensor
        ``[N, C_out, H_out, W_out]``, in the input's dtype and memory format.

    Examples
    --------
    >>> import torch, deformops
    >>> x = torch.randn(2, 8, 16, 16)
    >>> weight = torch.randn(4, 8, 3, 3)
    >>> offset = torch.randn(2, 2 * 9, 16, 16)
    >>> deformops.deform_conv2d(x, offset, weight, padding=1).shape
    torch.Size([2, 4, 16, 16])
    """
    input, offset, weight, mask, bias = _autocast.conv_arguments(input, offset, weight, mask, bias)
    _check_floating("input", input, 4, "[N, C_in, H, W]")
    _check_floating("weight", weight, 4, "[C_out, C_in/groups, kh, kw]")
    _check_floating("offset", offset, 4, "[N, 2*G*kh*kw, H_out, W_out]")
    floating = (input.dtype,)
    _check_same("weight", weight, input, "input", floating)
    _check_same("offset", offset, input, "input", floating)
    sh, sw = _pair("stride", stride, 1)
    ph, pw = _pair("padding", padding, 0)
    dh, dw = _pair("dilation", dilation, 1)

    n, c_in, height, width = input.shape
    c_out, c_per_group, kh, kw = weight.shape
    if c_per_group == 0 or kh == 0 or kw == 0 or c_in % c_per_group != 0:
        raise ValueError(
            f"weight: expected shape [C_out, C_in/groups, kh, kw] with C_in/groups dividing "
            f"C_in={c_in} and kh, kw > 0, got {_shape(weight)}"
        )
    groups = c_in // c_per_group
    if c_out % groups != 0:
        raise ValueError(
            f"weight: C_out={c_out} is not divisible by groups={groups} (C_in={c_in} / "
            f"weight.shape[1]={c_per_group})"
        )
    h_out = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    w_out = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if h_out <= 0 or w_out <= 0:
        raise ValueError(
            f"input: spatial size {(height, width)} is too small for kernel {(kh, kw)} with "
            f"padding {(ph, pw)} and dilation {(dh, dw)}: output size would be {(h_out, w_out)}"
        )
    k = kh * kw
    offset_groups = offset.shape[1] // (2 * k)
    if offset.shape[1] == 0 or offset.shape[1] % (2 * k) != 0 or c_in % offset_groups != 0:
        raise ValueError(
            f"offset: expected 2*G*kh*kw channels (kh*kw={k}) with G offset groups dividing "
            f"C_in={c_in}, got shape {_shape(offset)}"
        )
    expected_offset = (n, 2 * offset_groups * k, h_out, w_out)
    _check_shape("offset", offset, expected_offset, "[N, 2*G*kh*kw, H_out, W_out]")
    if mask is not None:
        _check_floating("mask", mask, 4, "[N, G*kh*kw, H_out, W_out]")
        _check_same("mask", mask, input, "input", floating)
        _check_shape(
            "mask", mask, (n, offset_groups * k, h_out, w_out), "[N, G*kh*kw, H_out, W_out]"
        )
    if bias is not None:
        _check_floating("bias", bias, 1, "[C_out]")
        _check_same("bias", bias, input, "input", floating)
        _check_shape("bias", bias, (c_out,), "[C_out]")
    return ops.call("deform_conv2d", input, offset, weight, mask, bias, sh, sw, ph, pw, dh, dw)


_INTEGER = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_index(name: str, t: object, ndim: int, expected: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected an int64 tensor {expected}, got {type(t).__name__}")
    if t.dtype not in _INTEGER:
        raise TypeError(
            f"{name}: expected an integer (int64) tensor {expected}, got dtype {t.dtype}"
        )
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d tensor {expected}, got shape {_shape(t)}")
    return t


class _LevelCheckCache:
    """Remembers the last ``(spatial_shapes, level_start_index, S)`` found consistent.

    Checking level values reads them on the host, which synchronises a GPU. Models pass the
    same tensors to every layer, so the check runs once per new (or modified) tensor pair.
    Weak references keep a freed tensor's address from being mistaken for a checked one.
    """

    def __init__(self) -> None:
        self._refs: tuple[weakref.ref, weakref.ref] | None = None
        self._state: tuple[int, int, int] | None = None

    @staticmethod
    def _state_of(shapes: Tensor, starts: Tensor, s: int) -> tuple[int, int, int]:
        return shapes._version, starts._version, s

    def seen(self, shapes: Tensor, starts: Tensor, s: int) -> bool:
        return (
            self._refs is not None
            and self._refs[0]() is shapes
            and self._refs[1]() is starts
            and self._state == self._state_of(shapes, starts, s)
        )

    def remember(self, shapes: Tensor, starts: Tensor, s: int) -> None:
        self._refs = (weakref.ref(shapes), weakref.ref(starts))
        self._state = self._state_of(shapes, starts, s)


_level_cache = _LevelCheckCache()


def _skip_value_checks(t: Tensor) -> bool:
    """Value checks read tensors on the host: impossible while tracing or capturing a graph."""
    if torch.compiler.is_compiling():
        return True
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _check_levels(spatial_shapes: Tensor, level_start_index: Tensor, s: int) -> None:
    """Check level sizes against ``S`` and the start indices against the sizes."""
    if _skip_value_checks(spatial_shapes) or _level_cache.seen(
        spatial_shapes, level_start_index, s
    ):
        return
    both = torch.cat([spatial_shapes.reshape(-1), level_start_index.reshape(-1)]).tolist()
    levels = spatial_shapes.shape[0]
    sizes = [(both[2 * i], both[2 * i + 1]) for i in range(levels)]
    starts = both[2 * levels :]
    if any(h < 0 or w < 0 for h, w in sizes):
        raise ValueError(f"spatial_shapes: expected non-negative (H_l, W_l), got {sizes}")
    total = sum(h * w for h, w in sizes)
    if total != s:
        raise ValueError(
            f"value: expected S = sum of H_l*W_l over spatial_shapes = {total}, got S = {s} "
            f"(spatial_shapes {sizes})"
        )
    expected = [sum(h * w for h, w in sizes[:i]) for i in range(levels)]
    if starts != expected:
        raise ValueError(
            f"level_start_index: expected {expected} (cumulative level sizes of spatial_shapes "
            f"{sizes}), got {starts}"
        )
    _level_cache.remember(spatial_shapes, level_start_index, s)


def multi_scale_deformable_attention(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention, as Deformable DETR's ``MSDeformAttnFunction``.

    For each query and head, samples each level ``l`` bilinearly (zero outside the map) at
    pixel ``(x*W_l - 0.5, y*H_l - 0.5)`` for each of ``P`` normalised locations ``(x, y)``,
    and returns the attention-weighted sum of the ``L*P`` samples.

    Parameters
    ----------
    value : Tensor
        ``[N, S, M, D]``: ``S = sum(H_l*W_l)`` flattened positions, ``M`` heads, ``D`` channels.
    spatial_shapes : Tensor
        ``[L, 2]`` integer, ``(H_l, W_l)`` per level.
    level_start_index : Tensor
        ``[L]`` integer, the offset of each level in ``S``.
    sampling_locations : Tensor
        ``[N, Q, M, L, P, 2]`` normalised ``(x, y)``; float32 is accepted with a
        half-precision ``value``.
    attention_weights : Tensor
        ``[N, Q, M, L, P]``; float32 is accepted with a half-precision ``value``.

    Returns
    -------
    Tensor
        ``[N, Q, M*D]`` in the dtype of ``value``.

    Examples
    --------
    >>> import torch, deformops
    >>> shapes = torch.tensor([[8, 8], [4, 4]])
    >>> starts = torch.tensor([0, 64])
    >>> value = torch.randn(2, 80, 4, 16)
    >>> loc = torch.rand(2, 10, 4, 2, 3, 2)
    >>> attn = torch.rand(2, 10, 4, 2, 3).softmax(-1)
    >>> deformops.multi_scale_deformable_attention(value, shapes, starts, loc, attn).shape
    torch.Size([2, 10, 64])
    """
    value, sampling_locations, attention_weights = _autocast.msda_arguments(
        value, sampling_locations, attention_weights
    )
    _check_floating("value", value, 4, "[N, S, M, D]")
    _check_index("spatial_shapes", spatial_shapes, 2, "[L, 2]")
    _check_index("level_start_index", level_start_index, 1, "[L]")
    _check_floating("sampling_locations", sampling_locations, 6, "[N, Q, M, L, P, 2]")
    _check_floating("attention_weights", attention_weights, 5, "[N, Q, M, L, P]")
    dtypes = (
        (value.dtype,)
        if value.dtype in (torch.float32, torch.float64)
        else (value.dtype, torch.float32)
    )
    _check_same("sampling_locations", sampling_locations, value, "value", dtypes)
    _check_same("attention_weights", attention_weights, value, "value", dtypes)
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if t.device != value.device:
            raise ValueError(
                f"{name}: expected a tensor on value's device {value.device}, got {t.device}"
            )

    n, s, m, _d = value.shape
    levels = spatial_shapes.shape[0]
    if spatial_shapes.shape[1] != 2:
        raise ValueError(
            f"spatial_shapes: expected shape [L, 2] (H_l, W_l), got {_shape(spatial_shapes)}"
        )
    _check_shape(
        "level_start_index",
        level_start_index,
        (levels,),
        "[L] with L from spatial_shapes",
    )
    q, points = sampling_locations.shape[1], sampling_locations.shape[4]
    _check_shape(
        "sampling_locations",
        sampling_locations,
        (n, q, m, levels, points, 2),
        "[N, Q, M, L, P, 2] with N, M from value and L from spatial_shapes",
    )
    _check_shape(
        "attention_weights",
        attention_weights,
        (n, q, m, levels, points),
        "[N, Q, M, L, P] matching sampling_locations",
    )
    _check_levels(spatial_shapes, level_start_index, s)
    return ops.call(
        "multi_scale_deformable_attention",
        value,
        spatial_shapes.long(),
        level_start_index.long(),
        sampling_locations,
        attention_weights,
    )


def _check_number(name: str, value: object, positive: bool = False) -> float:
    """Check that ``value`` is a finite real number (positive when ``positive``)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"{name}: expected a number, got {value!r}")
    if not math.isfinite(value) or (positive and value <= 0):
        kind = "positive finite" if positive else "finite"
        raise ValueError(f"{name}: expected a {kind} number, got {value!r}")
    return float(value)


def _check_batch_indices(rois: Tensor, batch: int) -> None:
    """Check that the batch indices (column 0) of ``rois`` lie in ``[0, N)``.

    Skipped while compiling or capturing (see :func:`_skip_value_checks`); the kernels
    then pool zeros for such a RoI instead of reading outside the input.
    """
    if _skip_value_checks(rois) or rois.shape[0] == 0:
        return
    index = rois[:, 0]
    bad = ~((index >= 0) & (index < batch))
    if bool(bad.any()):
        shown = index[bad][:5].tolist()
        raise ValueError(
            f"rois: expected batch indices (column 0) in [0, N) = [0, {batch}), got {shown}"
        )


def deform_roi_pool(
    input: Tensor,
    rois: Tensor,
    offset: Tensor | None = None,
    output_size: IntPair = 7,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
) -> Tensor:
    """Deformable RoI pooling (Dai et al., ICCV 2017), as mmcv's ``deform_roi_pool``.

    RoI ``k = (b, x1, y1, x2, y2)`` covers the box from ``(x1*s - 0.5, y1*s - 0.5)`` to
    ``(x2*s - 0.5, y2*s - 0.5)`` of image ``b`` (``s = spatial_scale``), split into
    ``out_h x out_w`` bins. Bin ``(ph, pw)`` is moved by ``gamma * roi_w *
    offset[k, 0, ph, pw]`` along x and ``gamma * roi_h * offset[k, 1, ph, pw]`` along y,
    and averages ``g_h x g_w`` bilinear samples at the centres of its sub-cells, read with
    RoIAlign's border rule (clamped into the map within one pixel of it, zero beyond);
    ``g = sampling_ratio`` per side, or ``ceil(roi side / bins)`` when it is ``<= 0``.
    Without offsets (or with zeros) this is ``torchvision.ops.roi_align(...,
    aligned=True)``.

    Parameters
    ----------
    input : Tensor
        ``[N, C, H, W]``, contiguous or channels_last.
    rois : Tensor
        ``[K, 5]`` rows ``(batch index, x1, y1, x2, y2)`` in the coordinates of the image
        (``input`` pixels times ``1 / spatial_scale``); batch indices in ``[0, N)``. Same
        dtype as ``input``, or float32 with a half-precision input. No gradient.
    offset : Tensor, optional
        ``[K, 2, out_h, out_w]``: channel 0 moves each bin along x, channel 1 along y, in
        units of ``gamma`` times the RoI's width and height. Same dtype as ``input``, or
        float32 with a half-precision input.
    output_size : int or (int, int)
        ``(out_h, out_w)``, bins per RoI side.
    spatial_scale : float
        Input pixels per unit of the RoI coordinates (e.g. 1/16 on a stride-16 map).
    sampling_ratio : int
        Samples per bin side; ``<= 0``: ``ceil(roi_h / out_h)`` by ``ceil(roi_w / out_w)``
        for each RoI (adaptive).
    gamma : float
        Scale of the offsets.

    Returns
    -------
    Tensor
        ``[K, C, out_h, out_w]``, contiguous, in the dtype of ``input``.

    Examples
    --------
    >>> import torch, deformops
    >>> x = torch.randn(2, 16, 32, 32)
    >>> rois = torch.tensor([[0, 4.0, 4.0, 20.0, 28.0], [1, 0.0, 8.0, 31.0, 16.0]])
    >>> offset = 0.1 * torch.randn(2, 2, 7, 7)
    >>> deformops.deform_roi_pool(x, rois, offset, output_size=7).shape
    torch.Size([2, 16, 7, 7])
    """
    input, rois, offset = _autocast.roi_pool_arguments(input, rois, offset)
    _check_floating("input", input, 4, "[N, C, H, W]")
    _check_floating("rois", rois, 2, "[K, 5]")
    coordinates = (
        (input.dtype,)
        if input.dtype in (torch.float32, torch.float64)
        else (input.dtype, torch.float32)
    )
    _check_same("rois", rois, input, "input", coordinates)
    out_h, out_w = _pair("output_size", output_size, 1)
    scale = _check_number("spatial_scale", spatial_scale, positive=True)
    if not isinstance(sampling_ratio, int) or isinstance(sampling_ratio, bool):
        raise TypeError(f"sampling_ratio: expected an int, got {sampling_ratio!r}")
    gamma = _check_number("gamma", gamma)
    k = rois.shape[0]
    _check_shape("rois", rois, (k, 5), "[K, 5] rows (batch index, x1, y1, x2, y2)")
    if offset is not None:
        _check_floating("offset", offset, 4, "[K, 2, out_h, out_w]")
        _check_same("offset", offset, input, "input", coordinates)
        _check_shape(
            "offset",
            offset,
            (k, 2, out_h, out_w),
            "[K, 2, out_h, out_w] with K from rois and (out_h, out_w) = output_size",
        )
    _check_batch_indices(rois, input.shape[0])
    return ops.call(
        "deform_roi_pool", input, rois, offset, out_h, out_w, scale, sampling_ratio, gamma
    )
