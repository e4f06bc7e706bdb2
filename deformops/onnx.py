"""ONNX export: both operators written with standard ONNX operators.

``torch.onnx.export`` (the dynamo exporter, ``dynamo=True``, the default) translates each
``torch.ops.deformops`` operator with a function of this module, passed in its
``custom_translation_table``; :func:`translation_table` returns that table. The graph it
produces has standard ONNX operators only (domain ``""``), so it runs in onnxruntime and in
any runtime that implements the operators below, without deformops:

- ``deformops::multi_scale_deformable_attention``: one ``GridSample`` per level
  (bilinear, zero padding, ``align_corners=0``, grid ``2*location - 1``), each level's
  samples weighted and summed over points (``Mul``, ``ReduceSum``), the levels added
  (``Sum``): :func:`multi_scale_deformable_attention_as_gridsample`.
- ``deformops::deform_conv2d``: the opset-19 ``DeformConv`` operator
  (:func:`deform_conv2d_as_deformconv`, the default: faster in onnxruntime), or a
  decomposition into one ``GridSample`` over the offset-displaced sampling grid and a
  ``MatMul`` with the weight (:func:`deform_conv2d_as_gridsample`), for runtimes without
  ``DeformConv`` (onnxruntime added it in 2026) or models below opset 19.

The translation functions are annotated with onnxscript's ``TensorType`` (the exporter
reads the annotations to match them to the operators); while the graph is built they are
called with ``onnxscript.ir.Value`` graph values (dtype and shape known, dimensions int or
symbolic) and the operators' int arguments, and call ONNX operators on them.

Channel counts and kernel sizes must be static; batch, map sizes and query counts may be
dynamic (``torch.export.Dim``), and level shapes are read from ``spatial_shapes`` at run
time. This module needs ``onnxscript`` (``pip install onnxscript``); it is not imported by
``import deformops``. See the page "Export: torch.export and ONNX" of the documentation.

Examples
--------
>>> import torch
>>> import deformops.onnx
>>> from deformops.nn import DeformConv2d
>>> program = torch.onnx.export(
...     DeformConv2d(4, 8).eval(),
...     (torch.randn(2, 4, 16, 16),),
...     custom_translation_table=deformops.onnx.translation_table(),
...     dynamic_shapes=({0: torch.export.Dim("batch")},),
...     verbose=False,
... )
>>> sorted({node.op_type for node in program.model_proto.graph.node})
['Conv', 'DeformConv', 'Sigmoid', 'Split']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch

try:
    from onnxscript import ir, opset19
    from onnxscript import opset18 as op
    from onnxscript.onnx_types import TensorType
except ImportError as error:
    raise ImportError(
        "deformops.onnx needs onnxscript, which torch.onnx.export needs too: "
        "pip install onnx onnxscript"
    ) from error

__all__ = [
    "deform_conv2d_as_deformconv",
    "deform_conv2d_as_gridsample",
    "multi_scale_deformable_attention_as_gridsample",
    "translation_table",
]

ConvTranslation = Literal["DeformConv", "GridSample"]


def _ints(values: Sequence[int]) -> ir.Value:
    """A constant 1-d int64 tensor."""
    return op.Constant(value_ints=list(values))


def _float_like(value: float, like: ir.Value) -> ir.Value:
    """A scalar constant in ``like``'s dtype."""
    return op.CastLike(op.Constant(value_float=value), like)


def _size(shape: ir.Value, axis: int) -> ir.Value:
    """``[shape[axis]]``: one dimension of a ``Shape`` output, as a 1-d tensor."""
    return op.Slice(shape, _ints([axis]), _ints([axis + 1]))


def _static(name: str, value: ir.Value, axis: int) -> int:
    """Dimension ``axis`` of ``value``, which must be known when the graph is built."""
    size = value.shape[axis] if value.shape is not None else None
    if not isinstance(size, int):
        raise ValueError(
            f"{name}: dimension {axis} must be static for the ONNX export, got {size!r} "
            "(channel counts, kernel sizes, heads, levels and points cannot be dynamic)"
        )
    return size


def deform_conv2d_as_deformconv(
    input: TensorType,
    offset: TensorType,
    weight: TensorType,
    mask: TensorType | None,
    bias: TensorType | None,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
) -> TensorType:
    """``deformops::deform_conv2d`` as the ONNX operator ``DeformConv`` (opset >= 19).

    ONNX's ``DeformConv`` has the contract of ``torchvision.ops.deform_conv2d`` (offsets as
    ``(dy, dx)`` pairs per kernel point, bilinear sampling with zero padding, groups,
    offset groups, optional mask and bias), so this is one node. The model must be
    exported at opset 19 or later (``torch.onnx.export``'s default is 20).

    Parameters
    ----------
    input, offset, weight, mask, bias : onnxscript.ir.Value
        The operator's tensors, with the shapes of :func:`deformops.deform_conv2d`;
        ``mask`` and ``bias`` may be None. ``C_in``, ``C_out``, the kernel size and the
        offset channels must be static.
    stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w : int
        The convolution's parameters.

    Returns
    -------
    onnxscript.ir.Value
        ``[N, C_out, H_out, W_out]``.
    """
    c_in = _static("input", input, 1)
    c_per_group, kh, kw = (_static("weight", weight, axis) for axis in (1, 2, 3))
    offset_groups = _static("offset", offset, 1) // (2 * kh * kw)
    return opset19.DeformConv(
        input,
        weight,
        offset,
        bias,
        mask,
        dilations=[dilation_h, dilation_w],
        group=c_in // c_per_group,
        kernel_shape=[kh, kw],
        offset_group=offset_groups,
        pads=[pad_h, pad_w, pad_h, pad_w],
        strides=[stride_h, stride_w],
    )


def _normalised_base(
    size_out: ir.Value, step: int, pad: int, kernel_positions: list[int], extent: ir.Value
) -> ir.Value:
    """``[K, n_out]`` grid coordinate (``align_corners=0``) of each kernel point before offsets.

    Pixel ``p = o*step - pad + kernel_position`` maps to ``(2*p + 1) / extent - 1``.
    """
    start = op.Constant(value_int=0)
    delta = op.Constant(value_int=1)
    out = op.Range(start, op.Squeeze(size_out, _ints([0])), delta)
    out = op.Sub(op.Mul(out, op.Constant(value_int=step)), op.Constant(value_int=pad))
    pixel = op.Add(op.Unsqueeze(_ints(kernel_positions), _ints([1])), op.Unsqueeze(out, _ints([0])))
    pixel = op.CastLike(pixel, extent)
    two, one = _float_like(2.0, extent), _float_like(1.0, extent)
    return op.Sub(op.Div(op.Add(op.Mul(pixel, two), one), extent), one)


def deform_conv2d_as_gridsample(
    input: TensorType,
    offset: TensorType,
    weight: TensorType,
    mask: TensorType | None,
    bias: TensorType | None,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
) -> TensorType:
    """``deformops::deform_conv2d`` as ``GridSample`` and ``MatMul`` (opset 18 and later).

    Kernel point ``k = i*kw + j`` of output pixel ``(ho, wo)`` samples pixel
    ``y = ho*sh - ph + i*dh + dy``, ``x = wo*sw - pw + j*dw + dx`` (the contract of
    :func:`deformops.deform_conv2d`). Pixel coordinates become ``GridSample`` coordinates
    with ``align_corners=0``: ``gx = (2*x + 1) / W - 1`` (so ``GridSample`` samples back
    at ``x``), and its bilinear mode with ``padding_mode="zeros"`` gives each corner outside
    the map a zero, as the contract asks. The input, seen as ``[N*G, C_in/G, H, W]`` (``G``
    offset groups), is sampled once on a grid ``[N*G, K*H_out, W_out, 2]``; the samples,
    times the mask, form columns ``[N, groups, C_in/groups*K, H_out*W_out]`` that one
    ``MatMul`` with the weight ``[groups, C_out/groups, C_in/groups*K]`` contracts; the
    bias is added last.

    Parameters and return value are those of :func:`deform_conv2d_as_deformconv`.
    """
    c_in = _static("input", input, 1)
    c_out, c_per_group, kh, kw = (_static("weight", weight, axis) for axis in range(4))
    groups, k = c_in // c_per_group, kh * kw
    offset_groups = _static("offset", offset, 1) // (2 * k)
    in_shape, out_shape = op.Shape(input), op.Shape(offset)
    h_out, w_out = _size(out_shape, 2), _size(out_shape, 3)
    pixels = op.Mul(h_out, w_out)
    height = op.CastLike(_size(in_shape, 2), input)
    width = op.CastLike(_size(in_shape, 3), input)

    ky = [i * dilation_h for i in range(kh) for _ in range(kw)]
    kx = [j * dilation_w for _ in range(kh) for j in range(kw)]
    base_y = op.Unsqueeze(_normalised_base(h_out, stride_h, pad_h, ky, height), _ints([1, 3]))
    base_x = op.Unsqueeze(_normalised_base(w_out, stride_w, pad_w, kx, width), _ints([1, 2]))
    # offsets [N, G, K, 2, H_out, W_out] as (dy, dx); grid coordinates are (x, y)
    offset = op.Reshape(offset, op.Concat(_ints([0, offset_groups, k, 2]), h_out, w_out, axis=0))
    dy, dx = op.Split(offset, axis=3, num_outputs=2)
    two = _float_like(2.0, input)
    gx = op.Add(op.Mul(dx, op.Div(two, width)), base_x)  # base [K, 1, 1, W_out]
    gy = op.Add(op.Mul(dy, op.Div(two, height)), base_y)  # base [K, 1, H_out, 1]
    grid = op.Concat(gx, gy, axis=3)  # [N, G, K, 2, H_out, W_out]
    grid = op.Transpose(grid, perm=[0, 1, 2, 4, 5, 3])
    grid = op.Reshape(
        grid, op.Concat(_ints([-1]), op.Mul(_ints([k]), h_out), w_out, _ints([2]), axis=0)
    )

    image = op.Reshape(
        input,
        op.Concat(
            _ints([-1, c_in // offset_groups]), _size(in_shape, 2), _size(in_shape, 3), axis=0
        ),
    )
    columns = op.GridSample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=0)
    columns = op.Reshape(
        columns, op.Concat(_ints([-1, offset_groups, c_in // offset_groups, k]), pixels, axis=0)
    )
    if mask is not None:
        mask = op.Reshape(mask, op.Concat(_ints([-1, offset_groups, 1, k]), pixels, axis=0))
        columns = op.Mul(columns, mask)
    columns = op.Reshape(columns, op.Concat(_ints([-1, groups, c_per_group * k]), pixels, axis=0))
    matrix = op.Reshape(weight, _ints([groups, c_out // groups, c_per_group * k]))
    out = op.MatMul(matrix, columns)  # [N, groups, C_out/groups, H_out*W_out]
    out = op.Reshape(out, op.Concat(_ints([-1, c_out]), h_out, w_out, axis=0))
    if bias is not None:
        out = op.Add(out, op.Reshape(bias, _ints([1, c_out, 1, 1])))
    return out


def multi_scale_deformable_attention_as_gridsample(
    value: TensorType,
    spatial_shapes: TensorType,
    level_start_index: TensorType,
    sampling_locations: TensorType,
    attention_weights: TensorType,
) -> TensorType:
    """``deformops::multi_scale_deformable_attention`` as one ``GridSample`` per level.

    The contract samples level ``l`` at pixel ``(x*W_l - 0.5, y*H_l - 0.5)`` with zero
    padding, which is ``GridSample`` (bilinear, ``padding_mode="zeros"``,
    ``align_corners=0``) at grid ``2*location - 1``. For each level, the value positions
    ``[level_start_index[l], + H_l*W_l)`` are seen as ``N*M`` maps ``[D, H_l, W_l]``,
    sampled at ``[N*M, Q, P]`` points, weighted and summed over the ``P`` points; the
    ``L`` levels are added. Level shapes and starts are read from the tensors at run
    time, so one graph serves any image size.

    Parameters
    ----------
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights : onnxscript.ir.Value
        The operator's tensors, with the shapes of
        :func:`deformops.multi_scale_deformable_attention`. ``M``, ``D``, ``L`` and
        ``P`` must be static; locations and weights are cast to the value's dtype.

    Returns
    -------
    onnxscript.ir.Value
        ``[N, Q, M*D]``.
    """
    m, d = _static("value", value, 2), _static("value", value, 3)
    levels = _static("sampling_locations", sampling_locations, 3)
    points = _static("sampling_locations", sampling_locations, 4)
    batch = _size(op.Shape(value), 0)
    queries = _size(op.Shape(sampling_locations), 1)
    locations = op.CastLike(sampling_locations, value)
    grid = op.Sub(op.Mul(locations, _float_like(2.0, value)), _float_like(1.0, value))
    grid = op.Transpose(grid, perm=[0, 2, 3, 1, 4, 5])  # [N, M, L, Q, P, 2]
    grid = op.Reshape(grid, op.Concat(_ints([-1, levels]), queries, _ints([points, 2]), axis=0))
    weights = op.Transpose(op.CastLike(attention_weights, value), perm=[0, 2, 3, 1, 4])
    weights = op.Reshape(
        weights, op.Concat(_ints([-1, levels, 1]), queries, _ints([points]), axis=0)
    )
    per_level = []
    for level in range(levels):
        index = op.Constant(value_int=level)
        extent = op.Gather(spatial_shapes, index, axis=0)  # [2]: (H_l, W_l)
        start = op.Gather(level_start_index, _ints([level]), axis=0)
        end = op.Add(start, op.ReduceProd(extent, keepdims=1))
        maps = op.Transpose(op.Slice(value, start, end, _ints([1])), perm=[0, 2, 3, 1])
        maps = op.Reshape(maps, op.Concat(_ints([-1, d]), extent, axis=0))  # [N*M, D, H_l, W_l]
        samples = op.GridSample(
            maps,
            op.Gather(grid, index, axis=1),
            mode="bilinear",
            padding_mode="zeros",
            align_corners=0,
        )  # [N*M, D, Q, P]
        weighted = op.Mul(samples, op.Gather(weights, index, axis=1))
        per_level.append(op.ReduceSum(weighted, _ints([3]), keepdims=0))
    out = op.Sum(*per_level)  # [N*M, D, Q]
    out = op.Reshape(out, op.Concat(batch, _ints([m * d]), queries, axis=0))
    return op.Transpose(out, perm=[0, 2, 1])


_CONV_TRANSLATIONS: dict[str, Callable[..., TensorType]] = {
    "DeformConv": deform_conv2d_as_deformconv,
    "GridSample": deform_conv2d_as_gridsample,
}


def translation_table(conv: ConvTranslation = "DeformConv") -> dict[Callable, Callable]:
    """The ``custom_translation_table`` of ``torch.onnx.export`` for both operators.

    Parameters
    ----------
    conv : {"DeformConv", "GridSample"}
        The convolution as the ONNX operator ``DeformConv`` (opset >= 19; faster in
        onnxruntime) or as ``GridSample`` and ``MatMul`` (for runtimes without
        ``DeformConv``, and opset 18).

    Returns
    -------
    dict
        ``{torch.ops.deformops.deform_conv2d.default: ...,
        torch.ops.deformops.multi_scale_deformable_attention.default: ...}``.

    Examples
    --------
    >>> import torch, deformops.onnx
    >>> table = deformops.onnx.translation_table("GridSample")
    >>> table[torch.ops.deformops.deform_conv2d.default].__name__
    'deform_conv2d_as_gridsample'
    """
    if conv not in _CONV_TRANSLATIONS:
        raise ValueError(f"conv: expected one of {sorted(_CONV_TRANSLATIONS)}, got {conv!r}")
    return {
        torch.ops.deformops.deform_conv2d.default: _CONV_TRANSLATIONS[conv],
        torch.ops.deformops.multi_scale_deformable_attention.default: (
            multi_scale_deformable_attention_as_gridsample
        ),
    }
