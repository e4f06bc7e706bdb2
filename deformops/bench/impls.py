"""Implementations measured in the harness process, and the float64 references.

Each :class:`Impl` binds a workload's inputs (:func:`workloads.make_inputs`) to a
:class:`timing.Case`. The peers (published deformops 3.0.1) are not here: they run in a
subprocess, see :mod:`.peers`.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import deformops
from deformops import reference

from .timing import Case
from .workloads import ConvWorkload, MSDAWorkload, RoiPoolWorkload, Workload, differentiable

#: Which float64 computation an implementation's results are compared with: the
#: deformable operator, a dense conv2d of the convolution's shape, or the RoI pooling
#: without offsets (RoIAlign).
DEFORMABLE, DENSE, NO_OFFSET = "deformable", "dense", "no-offset"


@dataclasses.dataclass(frozen=True)
class Impl:
    """An implementation of one operator measured in this process.

    Attributes
    ----------
    name, op : str
        Implementation name (``--impl``) and operator (``"msda"``, ``"conv"`` or
        ``"roi"``).
    build : callable
        ``(workload, inputs) -> Case``.
    version : callable
        Version string of what is measured.
    expected : str
        :data:`DEFORMABLE` (the operator in float64), :data:`DENSE` (a dense conv2d) or
        :data:`NO_OFFSET` (the RoI pooling without offsets: RoIAlign).
    unavailable : callable
        Why it cannot run here (None when it can).
    """

    name: str
    op: str
    build: Callable[[Workload, dict[str, Tensor]], Case]
    version: Callable[[], str]
    expected: str = DEFORMABLE
    unavailable: Callable[[], str | None] = lambda: None

    def gradients(self, workload: Workload) -> tuple[str, ...]:
        """Names of the inputs whose gradients this implementation returns, in order."""
        if self.expected == DENSE:
            return _dense_inputs(workload)
        if self.expected == NO_OFFSET:
            return ("input",)
        return differentiable(workload)


def _dense_inputs(workload: Workload) -> tuple[str, ...]:
    """The differentiable inputs of the dense convolution of a workload's shape."""
    assert isinstance(workload, ConvWorkload)
    return ("input", "weight", "bias") if workload.bias else ("input", "weight")


def _leaves(inputs: dict[str, Tensor], names: tuple[str, ...]) -> list[Tensor]:
    return [inputs[name].detach().requires_grad_() for name in names]


def grid_sample_msda(
    value: Tensor,
    levels: tuple[tuple[int, int], ...],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention from ``F.grid_sample``, one call per level.

    The pure-PyTorch formulation that Deformable DETR ships as its CPU fallback: every
    level is viewed as an ``[N*M, D, H_l, W_l]`` image and sampled at ``2*loc - 1``
    (``align_corners=False``, zero padding); everything is computed in the input dtype.

    Parameters
    ----------
    value : Tensor
        ``[N, S, M, D]``.
    levels : tuple of (int, int)
        ``(H_l, W_l)`` of each level (Python ints: no device synchronisation).
    sampling_locations : Tensor
        ``[N, Q, M, L, P, 2]`` normalised ``(x, y)``.
    attention_weights : Tensor
        ``[N, Q, M, L, P]``.

    Returns
    -------
    Tensor
        ``[N, Q, M*D]``.
    """
    n, _, m, d = value.shape
    _, q, _, num_levels, points, _ = sampling_locations.shape
    per_level = value.split([h * w for h, w in levels], dim=1)
    grids = 2 * sampling_locations - 1
    samples = []
    for level, (h, w) in enumerate(levels):
        image = per_level[level].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        grid = grids[:, :, :, level].transpose(1, 2).reshape(n * m, q, points, 2)
        samples.append(
            F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    stacked = torch.stack(samples, dim=-2).flatten(-2)  # [N*M, D, Q, L*P]
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, q, num_levels * points)
    return (stacked * weights).sum(-1).view(n, m * d, q).transpose(1, 2).contiguous()


def _msda_case(fn: Callable[..., Tensor]) -> Callable[[Workload, dict[str, Tensor]], Case]:
    def build(workload: Workload, inputs: dict[str, Tensor]) -> Case:
        value, loc, attn = leaves = _leaves(inputs, differentiable(workload))
        tables = [inputs["spatial_shapes"], inputs["level_start_index"]]
        return Case(leaves, lambda: fn(value, *tables, loc, attn), inputs["grad_output"], tables)

    return build


def _grid_sample_case(workload: Workload, inputs: dict[str, Tensor]) -> Case:
    assert isinstance(workload, MSDAWorkload)
    value, loc, attn = leaves = _leaves(inputs, differentiable(workload))
    return Case(
        leaves,
        lambda: grid_sample_msda(value, workload.levels, loc, attn),
        inputs["grad_output"],
    )


def _conv_case(fn: Callable[..., Tensor]) -> Callable[[Workload, dict[str, Tensor]], Case]:
    """A case calling ``fn`` with the argument order of ``torchvision.ops.deform_conv2d``."""

    def build(workload: Workload, inputs: dict[str, Tensor]) -> Case:
        assert isinstance(workload, ConvWorkload)
        names = differentiable(workload)
        leaves = _leaves(inputs, names)
        args = dict(zip(names, leaves, strict=True))

        def forward() -> Tensor:
            return fn(
                args["input"],
                args["offset"],
                args["weight"],
                args.get("bias"),
                workload.stride,
                workload.padding,
                workload.dilation,
                args.get("mask"),
            )

        return Case(leaves, forward, inputs["grad_output"])

    return build


def _dense_case(workload: Workload, inputs: dict[str, Tensor]) -> Case:
    assert isinstance(workload, ConvWorkload)
    leaves = _leaves(inputs, _dense_inputs(workload))

    def forward() -> Tensor:
        bias = leaves[2] if workload.bias else None
        return F.conv2d(
            leaves[0], leaves[1], bias, workload.stride, workload.padding, workload.dilation
        )

    return Case(leaves, forward, inputs["grad_output"])


def _roi_pool_case(
    fn: Callable[..., Tensor], offsets: bool = True
) -> Callable[[Workload, dict[str, Tensor]], Case]:
    """A case calling ``fn(input, rois, offset, output_size, spatial_scale, sampling_ratio,
    gamma)`` (mmcv's argument order); without ``offsets``, ``fn(input, rois, output_size,
    spatial_scale, sampling_ratio)`` (RoIAlign, the floor)."""

    def build(workload: Workload, inputs: dict[str, Tensor]) -> Case:
        assert isinstance(workload, RoiPoolWorkload)
        w = workload
        rois = inputs["rois"]
        if not offsets:
            leaves = _leaves(inputs, ("input",))
            return Case(
                leaves,
                lambda: fn(leaves[0], rois, w.output_size, w.spatial_scale, w.sampling_ratio),
                inputs["grad_output"],
                [rois],
            )
        x, offset = leaves = _leaves(inputs, differentiable(workload))
        return Case(
            leaves,
            lambda: fn(x, rois, offset, w.output_size, w.spatial_scale, w.sampling_ratio, w.gamma),
            inputs["grad_output"],
            [rois],
        )

    return build


def _torchvision_roi_align(
    input: Tensor, rois: Tensor, output_size: tuple[int, int], scale: float, ratio: int
) -> Tensor:
    roi_align = importlib.import_module("torchvision.ops").roi_align
    return roi_align(input, rois, output_size, scale, ratio, aligned=True)


def _torchvision_deform_conv2d(*args: object) -> Tensor:
    return importlib.import_module("torchvision.ops").deform_conv2d(*args)


def _torchvision_missing() -> str | None:
    if importlib.util.find_spec("torchvision") is None:
        return "torchvision is not installed"
    return None


def _torchvision_version() -> str:
    return importlib.import_module("torchvision").__version__


def _ours() -> str:
    return deformops.__version__


def _torch_cudnn() -> str:
    return f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}"


#: Every in-process implementation, by operator and name.
IMPLS: dict[str, dict[str, Impl]] = {
    "msda": {
        i.name: i
        for i in (
            Impl(
                "deformops", "msda", _msda_case(deformops.multi_scale_deformable_attention), _ours
            ),
            Impl(
                "reference", "msda", _msda_case(reference.multi_scale_deformable_attention), _ours
            ),
            Impl("pytorch-grid-sample", "msda", _grid_sample_case, _ours),
        )
    },
    "conv": {
        i.name: i
        for i in (
            Impl("deformops", "conv", _conv_case(deformops.deform_conv2d), _ours),
            Impl("reference", "conv", _conv_case(reference.deform_conv2d), _ours),
            Impl(
                "torchvision",
                "conv",
                _conv_case(_torchvision_deform_conv2d),
                _torchvision_version,
                unavailable=_torchvision_missing,
            ),
            Impl("cudnn-dense", "conv", _dense_case, _torch_cudnn, expected=DENSE),
        )
    },
    "roi": {
        i.name: i
        for i in (
            Impl("deformops", "roi", _roi_pool_case(deformops.deform_roi_pool), _ours),
            Impl("reference", "roi", _roi_pool_case(reference.deform_roi_pool), _ours),
            Impl(
                "torchvision",
                "roi",
                _roi_pool_case(_torchvision_roi_align, offsets=False),
                _torchvision_version,
                expected=NO_OFFSET,
                unavailable=_torchvision_missing,
            ),
        )
    },
}

#: The native-backend operator name of each benchmark operator.
OP_NAMES = {
    "msda": "multi_scale_deformable_attention",
    "conv": "deform_conv2d",
    "roi": "deform_roi_pool",
}


def expected_results(
    workload: Workload, inputs: dict[str, Tensor], kind: str = DEFORMABLE
) -> dict[str, Tensor]:
    """Output and gradients in float64, from the (rounded) inputs converted to float64.

    The deformable operators use :mod:`deformops.reference` (forward, and the backward
    that recomputes chunk by chunk, so memory stays bounded on the large workloads), so
    does the RoI pooling without offsets; the dense convolution uses ``F.conv2d`` and
    autograd.

    Returns
    -------
    dict of str to Tensor
        ``"output"`` and one entry per differentiable input, float64, on the inputs' device.
    """
    x = {name: t.double() if t.is_floating_point() else t for name, t in inputs.items()}
    go = x["grad_output"]
    if isinstance(workload, MSDAWorkload):
        args = [x[k] for k in ("value", "spatial_shapes", "level_start_index")]
        args += [x["sampling_locations"], x["attention_weights"]]
        out = reference.multi_scale_deformable_attention(*args)
        grads = reference.multi_scale_deformable_attention_backward(go, *args)
        return {"output": out, **dict(zip(differentiable(workload), grads, strict=True))}
    if isinstance(workload, RoiPoolWorkload):
        offset = x["offset"] if kind == DEFORMABLE else None
        args = (x["input"], x["rois"], offset, workload.output_size, workload.spatial_scale)
        args += (workload.sampling_ratio, workload.gamma)
        out = reference.deform_roi_pool(*args)
        g_input, g_offset = reference.deform_roi_pool_backward(go, *args)
        result = {"output": out, "input": g_input}
        return result if offset is None else {**result, "offset": g_offset}
    geometry = (workload.stride, workload.padding, workload.dilation)
    if kind == DENSE:
        names = _dense_inputs(workload)
        leaves = [x[k].detach().requires_grad_() for k in names]
        with torch.enable_grad():
            bias = leaves[2] if workload.bias else None
            out = F.conv2d(leaves[0], leaves[1], bias, *geometry)
            grads = torch.autograd.grad(out, leaves, go)
        return {"output": out.detach(), **dict(zip(names, grads, strict=True))}
    mask, bias = x.get("mask"), x.get("bias")
    out = reference.deform_conv2d(x["input"], x["offset"], x["weight"], bias, *geometry, mask)
    g_input, g_offset, g_weight, g_mask = reference.deform_conv2d_backward(
        go, x["input"], x["offset"], x["weight"], mask, *geometry
    )
    result = {"output": out, "input": g_input, "offset": g_offset, "weight": g_weight}
    if mask is not None:
        result["mask"] = g_mask
    if bias is not None:
        result["bias"] = go.sum((0, 2, 3))
    return result
