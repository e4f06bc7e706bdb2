"""Automatic mixed precision (``torch.autocast``) for the deformops operators.

Under ``torch.autocast(device_type, dtype)`` on the device of the operator's main input,
both operators run in the autocast dtype:

- ``deform_conv2d``: input, offset, weight, mask and bias are cast to the autocast dtype;
- ``multi_scale_deformable_attention``: the value is cast to the autocast dtype, and the
  sampling locations and attention weights to float32 (they keep the precision of the
  locations, as DESIGN.md allows beside a half-precision value);
- ``deform_roi_pool``: the input is cast to the autocast dtype, the RoIs and offsets to
  float32 (box coordinates of a large image need more than half precision).

A float64 main input is left alone with everything else (autocast never lowers float64).
The casts are ordinary differentiable ``Tensor.to`` calls, so each gradient comes back in
the dtype of the tensor the caller passed (a float32 parameter gets a float32 gradient).

The same rules serve two callers: the public functions of :mod:`deformops.functional`
apply them before checking their arguments (which must then agree in dtype), and the
custom operators ``torch.ops.deformops.deform_conv2d``,
``torch.ops.deformops.multi_scale_deformable_attention`` and
``torch.ops.deformops.deform_roi_pool`` get them as their autocast
kernels (dispatch keys ``AutocastCPU`` and ``AutocastCUDA``), which run the operator with
autocast disabled, so that the reference implementation inside does not autocast its own
operations. ``torch.library.register_autocast`` does not fit: it casts every floating
argument, sampling locations included, to one dtype fixed at registration.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import ops

__all__ = ["autocast_dtype", "conv_arguments", "msda_arguments", "roi_pool_arguments"]

_DEVICE_TYPES = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def autocast_dtype(t: object) -> torch.dtype | None:
    """The dtype an operator whose main input is ``t`` runs in under autocast.

    Parameters
    ----------
    t : object
        The main input (``input`` of the convolution, ``value`` of the attention).

    Returns
    -------
    torch.dtype or None
        ``torch.get_autocast_dtype`` of ``t``'s device type when autocast is enabled there
        and ``t`` is a floating tensor other than float64; None otherwise (no cast).
    """
    if not isinstance(t, Tensor) or not t.is_floating_point() or t.dtype == torch.float64:
        return None
    device_type = t.device.type
    if device_type not in _DEVICE_TYPES or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _cast(t: object, dtype: torch.dtype) -> object:
    """``t`` in ``dtype`` if it is a floating tensor; anything else unchanged."""
    if isinstance(t, Tensor) and t.is_floating_point():
        return t.to(dtype)
    return t


def conv_arguments(
    input: Tensor, offset: Tensor, weight: Tensor, mask: Tensor | None, bias: Tensor | None
) -> tuple:
    """The floating arguments of ``deform_conv2d`` as it runs them under autocast.

    Parameters
    ----------
    input, offset, weight, mask, bias : Tensor or None
        ``[N, C_in, H, W]``, ``[N, 2*G*kh*kw, H_out, W_out]``, ``[C_out, C_in/groups, kh,
        kw]``, ``[N, G*kh*kw, H_out, W_out]`` or None, ``[C_out]`` or None; they are not
        checked here (anything that is not a floating tensor passes through).

    Returns
    -------
    tuple
        ``(input, offset, weight, mask, bias)``, each floating tensor in
        :func:`autocast_dtype` of ``input``; unchanged when that is None.
    """
    dtype = autocast_dtype(input)
    if dtype is None:
        return input, offset, weight, mask, bias
    return tuple(_cast(t, dtype) for t in (input, offset, weight, mask, bias))


def msda_arguments(value: Tensor, sampling_locations: Tensor, attention_weights: Tensor) -> tuple:
    """The floating arguments of ``multi_scale_deformable_attention`` under autocast.

    Parameters
    ----------
    value, sampling_locations, attention_weights : Tensor
        ``[N, S, M, D]``, ``[N, Q, M, L, P, 2]``, ``[N, Q, M, L, P]``; not checked here.

    Returns
    -------
    tuple
        ``(value, sampling_locations, attention_weights)``: the value in
        :func:`autocast_dtype` of ``value``, the locations and weights in float32; all
        unchanged when that is None.
    """
    dtype = autocast_dtype(value)
    if dtype is None:
        return value, sampling_locations, attention_weights
    return (
        _cast(value, dtype),
        _cast(sampling_locations, torch.float32),
        _cast(attention_weights, torch.float32),
    )


def roi_pool_arguments(input: Tensor, rois: Tensor, offset: Tensor | None) -> tuple:
    """The floating arguments of ``deform_roi_pool`` under autocast.

    Parameters
    ----------
    input, rois, offset : Tensor or None
        ``[N, C, H, W]``, ``[K, 5]``, ``[K, 2, out_h, out_w]`` or None; not checked here.

    Returns
    -------
    tuple
        ``(input, rois, offset)``: the input in :func:`autocast_dtype` of ``input``, the
        RoIs and offsets in float32; all unchanged when that is None.
    """
    dtype = autocast_dtype(input)
    if dtype is None:
        return input, rois, offset
    return _cast(input, dtype), _cast(rois, torch.float32), _cast(offset, torch.float32)


def _conv_kernel(device_type: str) -> Callable[..., Tensor]:
    def kernel(input, offset, weight, mask, bias, *params):
        args = conv_arguments(input, offset, weight, mask, bias)
        with torch.autocast(device_type, enabled=False):
            return ops.deform_conv2d(*args, *params)

    return kernel


def _msda_kernel(device_type: str) -> Callable[..., Tensor]:
    def kernel(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        v, loc, attn = msda_arguments(value, sampling_locations, attention_weights)
        with torch.autocast(device_type, enabled=False):
            return ops.multi_scale_deformable_attention(
                v, spatial_shapes, level_start_index, loc, attn
            )

    return kernel


def _roi_pool_kernel(device_type: str) -> Callable[..., Tensor]:
    def kernel(input, rois, offset, *params):
        args = roi_pool_arguments(input, rois, offset)
        with torch.autocast(device_type, enabled=False):
            return ops.deform_roi_pool(*args, *params)

    return kernel


_library = torch.library.Library("deformops", "IMPL")
for _device_type, _key in _DEVICE_TYPES.items():
    _library.impl("deform_conv2d", _conv_kernel(_device_type), _key)
    _library.impl("multi_scale_deformable_attention", _msda_kernel(_device_type), _key)
    _library.impl("deform_roi_pool", _roi_pool_kernel(_device_type), _key)
