"""The ``torch.library`` operators of deformops: schemas, fake kernels, autograd, dispatch.

Six custom operators live in the ``deformops`` namespace:

- ``deformops::deform_conv2d`` and ``deformops::deform_conv2d_backward``
- ``deformops::multi_scale_deformable_attention`` and its ``_backward``
- ``deformops::deform_roi_pool`` and ``deformops::deform_roi_pool_backward``

Each forward has a fake (meta) kernel, so ``torch.compile`` and ``torch.export`` trace it
without running it, and a registered autograd formula that calls the backward operator.
The backward operators are not differentiable: asking for a second derivative
(``create_graph=True``) raises an error instead of returning a wrong one.

Each operator runs on the native library (``deformops_native``, compiled on first use by
:mod:`deformops._build`) where it has a kernel for the device, else on
:mod:`deformops.reference`. :func:`set_backend` and the environment variable
``DEFORMOPS_BACKEND`` choose between them; :func:`backend` reports the choice.

:func:`call` is how the public functions run an operator. An eager call on plain tensors
goes straight to the native forward operator, whose autograd is a C++ node
(``csrc/autograd.cpp``): the custom operators' Python layers cost more host time than
the kernels of a small layer take. Everything else (``torch.compile``, ``torch.export``,
``torch.jit.trace``, tensor subclasses such as fake tensors, dispatch and function modes,
functorch transforms, the reference backend) goes through the custom operators. Both run
the same kernels and give the same results.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Literal, cast

import torch
from torch import Tensor

from . import _build, reference

__all__ = ["backend", "set_backend"]

BackendName = Literal["native", "reference"]
_BACKENDS = ("native", "reference")
_override: str | None = None
_resolved: dict[tuple[str, str, str], bool] = {}


def _requested() -> str | None:
    """The backend asked for by :func:`set_backend` or ``DEFORMOPS_BACKEND`` (None: automatic)."""
    if _override is not None:
        return _override
    requested = os.environ.get("DEFORMOPS_BACKEND", "").strip().lower()
    if requested in ("", "auto"):
        return None
    if requested not in _BACKENDS:
        raise ValueError(
            f"DEFORMOPS_BACKEND: expected one of 'native', 'reference' or 'auto', got {requested!r}"
        )
    return requested


def set_backend(name: BackendName | None) -> None:
    """Choose the implementation of every operator in this process.

    Parameters
    ----------
    name : str or None
        ``"native"`` or ``"reference"``. ``"native"`` requires the compiled library (an error is raised at the next call if
        it cannot be built); ``"reference"`` uses the pure-PyTorch implementation; None
        restores the default: ``DEFORMOPS_BACKEND`` if set, else native where it builds,
        else reference.

    Examples
    --------
    >>> import deformops
    >>> deformops.set_backend("reference")
    >>> deformops.backend("cpu")
    'reference'
    >>> deformops.set_backend(None)
    """
    global _override
    if name is not None and name not in _BACKENDS:
        raise ValueError(f"name: expected 'native', 'reference' or None, got {name!r}")
    _override = name
    _resolved.clear()


_NATIVE_OPS = {
    "deform_conv2d": "deform_conv2d_forward",
    "multi_scale_deformable_attention": "msda_forward",
    "deform_roi_pool": "deform_roi_pool_forward",
}


def _native_has(op: str, device_type: str) -> bool:
    """Whether the loaded native library has a kernel of ``op`` for ``device_type``."""
    key = "CUDA" if device_type == "cuda" else "CPU"
    return torch._C._dispatch_has_kernel_for_dispatch_key(
        f"deformops_native::{_NATIVE_OPS[op]}", key
    )


def _use_native(op: str, device_type: str) -> bool:
    requested = _requested()
    if requested == "reference" or device_type not in ("cpu", "cuda"):
        return False
    key = (op, device_type, requested or "auto")
    if key not in _resolved:
        loaded = _build.load(device_type)
        available = loaded and _native_has(op, device_type)
        if requested == "native" and not available:
            cause = _build.load_error(device_type) or (
                f"the native library has no {device_type} kernel for {op}"
            )
            raise RuntimeError(f"deformops: the native backend was requested but {cause}")
        _resolved[key] = available
    return _resolved[key]


def backend(
    device: str | torch.device = "cpu",
    op: Literal["deform_conv2d", "multi_scale_deformable_attention", "deform_roi_pool"]
    | None = None,
) -> BackendName:
    """The implementation that runs an operator on a device.

    The first call for a device type builds (or loads from the cache) the native library.

    Parameters
    ----------
    device : str or torch.device
        Device on which the operator would run.
    op : str, optional
        ``"deform_conv2d"``, ``"multi_scale_deformable_attention"`` or
        ``"deform_roi_pool"``; by default, the backend of the first (``"native"`` only if
        every operator has a native kernel).

    Returns
    -------
    str
        ``"native"`` or ``"reference"``.

    Examples
    --------
    >>> import deformops
    >>> deformops.backend("cpu") in ("native", "reference")
    True
    """
    device_type = torch.device(device).type
    ops = _NATIVE_OPS if op is None else [op]
    if op is not None and op not in _NATIVE_OPS:
        raise ValueError(f"op: expected one of {sorted(_NATIVE_OPS)}, got {op!r}")
    return "native" if all(_use_native(name, device_type) for name in ops) else "reference"


def _native() -> Any:
    return torch.ops.deformops_native


def _eager_probes() -> tuple[Callable[[], Any], ...] | None:
    """torch's checks for modes and transforms (private: None where this torch lacks one)."""
    try:
        return (
            torch._C._is_torch_function_mode_enabled,
            torch._C._len_torch_dispatch_stack,
            torch._C._functorch.peek_interpreter_stack,
            torch._C._is_tracing,
        )
    except AttributeError:
        return None


_PROBES = _eager_probes()
_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def _plain_eager(args: tuple[object, ...]) -> bool:
    """Whether a call with ``args`` runs eagerly on plain tensors (see the module docstring)."""
    if _PROBES is None or torch.compiler.is_compiling():
        return False
    function_mode, dispatch_modes, transforms, tracing = _PROBES
    if function_mode() or dispatch_modes() or transforms() is not None or tracing():
        return False
    return all(type(a) in _PLAIN_TENSORS for a in args if isinstance(a, Tensor))


def call(op: str, *args: object) -> Tensor:
    """Run operator ``op`` on validated arguments (those of its custom operator).

    Parameters
    ----------
    op : str
        ``"deform_conv2d"``, ``"multi_scale_deformable_attention"`` or ``"deform_roi_pool"``.
    *args
        The custom operator's arguments, e.g. ``deform_conv2d(input, offset, weight, mask,
        bias, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w)``.

    Returns
    -------
    Tensor
        The operator's output, differentiable in its floating tensors.
    """
    device_type = cast(Tensor, args[0]).device.type
    if _plain_eager(args) and _use_native(op, device_type):
        return getattr(_native(), _NATIVE_OPS[op])(*args)
    return _CUSTOM_OPS[op](*args)


# ----------------------------------------------------------------------------------------
# Deformable convolution


@torch.library.custom_op("deformops::deform_conv2d", mutates_args=())
def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    mask: Tensor | None,
    bias: Tensor | None,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
) -> Tensor:
    """Deformable convolution on validated arguments (see :func:`deformops.deform_conv2d`)."""
    if _use_native("deform_conv2d", input.device.type):
        return _native().deform_conv2d_forward(
            input,
            offset,
            weight,
            mask,
            bias,
            stride_h,
            stride_w,
            pad_h,
            pad_w,
            dilation_h,
            dilation_w,
        )
    return reference.deform_conv2d(
        input,
        offset,
        weight,
        bias,
        (stride_h, stride_w),
        (pad_h, pad_w),
        (dilation_h, dilation_w),
        mask,
    )


@deform_conv2d.register_fake
def _deform_conv2d_fake(input, offset, weight, mask, bias, *params):
    out = input.new_empty((input.shape[0], weight.shape[0], offset.shape[2], offset.shape[3]))
    return out.contiguous(memory_format=reference.memory_format_of(input))


@torch.library.custom_op("deformops::deform_conv2d_backward", mutates_args=())
def deform_conv2d_backward(
    grad_output: Tensor,
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    mask: Tensor | None,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(input, offset, weight, mask)`` of the deformable convolution without bias.

    ``grad_mask`` is an empty tensor when ``mask`` is None.
    """
    params = (stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w)
    if _use_native("deform_conv2d", input.device.type):
        return tuple(
            _native().deform_conv2d_backward(grad_output, input, offset, weight, mask, *params)
        )
    gi, go, gw, gm = reference.deform_conv2d_backward(
        grad_output, input, offset, weight, mask, params[0:2], params[2:4], params[4:6]
    )
    return gi, go, gw, offset.new_empty(0) if gm is None else gm


@deform_conv2d_backward.register_fake
def _deform_conv2d_backward_fake(grad_output, input, offset, weight, mask, *params):
    grad_mask = offset.new_empty(0) if mask is None else torch.empty_like(mask)
    return torch.empty_like(input), torch.empty_like(offset), torch.empty_like(weight), grad_mask


def _deform_conv2d_setup_context(ctx, inputs, output):
    input, offset, weight, mask, bias, *params = inputs
    ctx.save_for_backward(input, offset, weight, mask)
    ctx.params = params
    ctx.has_bias = bias is not None


def _deform_conv2d_autograd(ctx, grad_output):
    input, offset, weight, mask = ctx.saved_tensors
    gi, go, gw, gm = deform_conv2d_backward(grad_output, input, offset, weight, mask, *ctx.params)
    gb = None
    if ctx.has_bias:
        # Over the pixels, then the images: as the native autograd node does (csrc/autograd.cpp).
        acc = torch.promote_types(grad_output.dtype, torch.float32)
        gb = grad_output.sum((2, 3), dtype=acc).sum(0).to(grad_output.dtype)
    return (gi, go, gw, None if mask is None else gm, gb) + (None,) * len(ctx.params)


deform_conv2d.register_autograd(_deform_conv2d_autograd, setup_context=_deform_conv2d_setup_context)


# ----------------------------------------------------------------------------------------
# Multi-scale deformable attention


@torch.library.custom_op("deformops::multi_scale_deformable_attention", mutates_args=())
def multi_scale_deformable_attention(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention on validated arguments.

    See :func:`deformops.multi_scale_deformable_attention`.
    """
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if _use_native("multi_scale_deformable_attention", value.device.type):
        return _native().msda_forward(*args)
    return reference.multi_scale_deformable_attention(*args)


@multi_scale_deformable_attention.register_fake
def _msda_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    n, _, m, d = value.shape
    return value.new_empty((n, sampling_locations.shape[1], m * d))


@torch.library.custom_op("deformops::multi_scale_deformable_attention_backward", mutates_args=())
def multi_scale_deformable_attention_backward(
    grad_output: Tensor,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(value, sampling_locations, attention_weights)`` of the attention."""
    args = (grad_output, value, spatial_shapes, level_start_index, sampling_locations)
    if _use_native("multi_scale_deformable_attention", value.device.type):
        return tuple(_native().msda_backward(*args, attention_weights))
    return reference.multi_scale_deformable_attention_backward(*args, attention_weights)


@multi_scale_deformable_attention_backward.register_fake
def _msda_backward_fake(grad_output, value, spatial_shapes, level_start_index, loc, attn):
    return torch.empty_like(value), torch.empty_like(loc), torch.empty_like(attn)


def _msda_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _msda_autograd(ctx, grad_output):
    value, spatial_shapes, level_start_index, loc, attn = ctx.saved_tensors
    gv, gl, ga = multi_scale_deformable_attention_backward(
        grad_output, value, spatial_shapes, level_start_index, loc, attn
    )
    return gv, None, None, gl, ga


multi_scale_deformable_attention.register_autograd(
    _msda_autograd, setup_context=_msda_setup_context
)


# ----------------------------------------------------------------------------------------
# Deformable RoI pooling


@torch.library.custom_op("deformops::deform_roi_pool", mutates_args=())
def deform_roi_pool(
    input: Tensor,
    rois: Tensor,
    offset: Tensor | None,
    pooled_height: int,
    pooled_width: int,
    spatial_scale: float,
    sampling_ratio: int,
    gamma: float,
) -> Tensor:
    """Deformable RoI pooling on validated arguments (see :func:`deformops.deform_roi_pool`)."""
    params = (pooled_height, pooled_width, spatial_scale, sampling_ratio, gamma)
    if _use_native("deform_roi_pool", input.device.type):
        return _native().deform_roi_pool_forward(input, rois, offset, *params)
    return reference.deform_roi_pool(
        input, rois, offset, (pooled_height, pooled_width), spatial_scale, sampling_ratio, gamma
    )


@deform_roi_pool.register_fake
def _deform_roi_pool_fake(input, rois, offset, pooled_height, pooled_width, *params):
    return input.new_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width))


@torch.library.custom_op("deformops::deform_roi_pool_backward", mutates_args=())
def deform_roi_pool_backward(
    grad_output: Tensor,
    input: Tensor,
    rois: Tensor,
    offset: Tensor | None,
    pooled_height: int,
    pooled_width: int,
    spatial_scale: float,
    sampling_ratio: int,
    gamma: float,
) -> tuple[Tensor, Tensor]:
    """Gradients ``(input, offset)`` of the deformable RoI pooling.

    ``grad_offset`` is an empty tensor when ``offset`` is None; ``grad_input`` has the
    memory format of ``input``.
    """
    params = (pooled_height, pooled_width, spatial_scale, sampling_ratio, gamma)
    if _use_native("deform_roi_pool", input.device.type):
        return tuple(_native().deform_roi_pool_backward(grad_output, input, rois, offset, *params))
    gi, go = reference.deform_roi_pool_backward(
        grad_output,
        input,
        rois,
        offset,
        (pooled_height, pooled_width),
        spatial_scale,
        sampling_ratio,
        gamma,
    )
    return gi, input.new_empty(0) if go is None else go


@deform_roi_pool_backward.register_fake
def _deform_roi_pool_backward_fake(grad_output, input, rois, offset, *params):
    grad_offset = input.new_empty(0) if offset is None else torch.empty_like(offset)
    return torch.empty_like(input), grad_offset


def _deform_roi_pool_setup_context(ctx, inputs, output):
    input, rois, offset, *params = inputs
    ctx.save_for_backward(input, rois, offset)
    ctx.params = params


def _deform_roi_pool_autograd(ctx, grad_output):
    input, rois, offset = ctx.saved_tensors
    gi, go = deform_roi_pool_backward(grad_output, input, rois, offset, *ctx.params)
    return (gi, None, None if offset is None else go) + (None,) * len(ctx.params)


deform_roi_pool.register_autograd(
    _deform_roi_pool_autograd, setup_context=_deform_roi_pool_setup_context
)


# ----------------------------------------------------------------------------------------
# The backward operators have no derivative of their own.


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "deformops: double backward is not supported (a gradient was computed with "
        "create_graph=True and then differentiated again); the first derivatives are exact"
    )


def _no_context(ctx, inputs, output):
    return None


for _backward_op in (
    deform_conv2d_backward,
    multi_scale_deformable_attention_backward,
    deform_roi_pool_backward,
):
    _backward_op.register_autograd(_no_double_backward, setup_context=_no_context)


_CUSTOM_OPS = {
    "deform_conv2d": deform_conv2d,
    "multi_scale_deformable_attention": multi_scale_deformable_attention,
    "deform_roi_pool": deform_roi_pool,
}
