"""The benchmark workloads of DESIGN.md and their random inputs.

This module imports nothing but torch: the peer worker loads it by file path (it cannot
import this package, whose name the published peer shares) and so generates, from the
same seed, exactly the inputs that the harness gives to its own implementations.

Inputs are random, never zeros: ``value``/``input``/``weight``/``bias`` are ``randn``,
sampling locations uniform in [0, 1], attention weights a softmax of ``randn`` over the
``L*P`` points of each query and head, offsets ``2*randn`` pixels, mask uniform in [0, 1],
and the gradient of the output ``randn``. The RoIs of the RoI pooling are detection
proposals on the image that the map covers (``1 / spatial_scale`` times its size): centres
uniform over the image, width and height each log-uniform between ``roi_min`` and
``roi_max`` image pixels, clipped to the image, batch indices uniform over the batch; their
offsets are ``randn`` (bins moved by ``gamma`` = 0.1 times the RoI size, times ``randn``). Everything is drawn in float32 from one
generator seeded with ``seed`` on the target device, then rounded to the benchmark dtype
(locations and weights included).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import Tensor

#: Benchmark dtype names and their torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}


@dataclasses.dataclass(frozen=True)
class MSDAWorkload:
    """A multi-scale deformable attention problem.

    ``queries`` None means one query per position of the pyramid (an encoder: ``Q = S``).
    """

    op: ClassVar[str] = "msda"
    name: str
    n: int
    levels: tuple[tuple[int, int], ...]
    queries: int | None
    heads: int
    head_dim: int
    points: int

    @property
    def positions(self) -> int:
        """``S``, the number of positions over all levels."""
        return sum(h * w for h, w in self.levels)

    @property
    def num_queries(self) -> int:
        """``Q``."""
        return self.positions if self.queries is None else self.queries

    def scaled(self, scale: float) -> MSDAWorkload:
        """The workload with every level side times ``scale`` (``N``, ``M``, ``D``, ``P``
        unchanged); an encoder keeps ``Q = S``, a decoder's ``Q`` scales by ``scale**2``."""
        levels = tuple((_scaled(h, scale), _scaled(w, scale)) for h, w in self.levels)
        queries = None if self.queries is None else _scaled(self.queries, scale * scale)
        return dataclasses.replace(self, levels=levels, queries=queries)


@dataclasses.dataclass(frozen=True)
class ConvWorkload:
    """A deformable convolution problem (one offset group per ``offset_groups``)."""

    op: ClassVar[str] = "conv"
    name: str
    n: int
    c_in: int
    c_out: int
    height: int
    width: int
    kernel: tuple[int, int] = (3, 3)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    offset_groups: int = 1
    mask: bool = True
    bias: bool = True

    @property
    def out_size(self) -> tuple[int, int]:
        """``(H_out, W_out)``."""
        return (
            _out_extent(
                self.height, self.kernel[0], self.stride[0], self.padding[0], self.dilation[0]
            ),
            _out_extent(
                self.width, self.kernel[1], self.stride[1], self.padding[1], self.dilation[1]
            ),
        )

    def scaled(self, scale: float) -> ConvWorkload:
        """The workload with ``H`` and ``W`` times ``scale`` (batch and channels unchanged)."""
        return dataclasses.replace(
            self, height=_scaled(self.height, scale), width=_scaled(self.width, scale)
        )


@dataclasses.dataclass(frozen=True)
class RoiPoolWorkload:
    """A deformable RoI pooling problem: ``rois`` RoIs on an ``[n, channels, height,
    width]`` map of stride ``1 / spatial_scale``, with offsets, adaptive sampling
    (``sampling_ratio`` 0) and ``gamma`` 0.1 (mmcv's defaults)."""

    op: ClassVar[str] = "roi"
    name: str
    n: int
    channels: int
    height: int
    width: int
    rois: int
    output_size: tuple[int, int] = (7, 7)
    spatial_scale: float = 1 / 16
    sampling_ratio: int = 0
    gamma: float = 0.1
    roi_min: float = 16.0  # smallest RoI side, image pixels
    roi_max: float = 512.0  # largest RoI side, image pixels

    def scaled(self, scale: float) -> RoiPoolWorkload:
        """The workload with ``H``, ``W`` and the RoI sides times ``scale``."""
        return dataclasses.replace(
            self,
            height=_scaled(self.height, scale),
            width=_scaled(self.width, scale),
            roi_min=self.roi_min * scale,
            roi_max=self.roi_max * scale,
        )


Workload = MSDAWorkload | ConvWorkload | RoiPoolWorkload

_DETR_LEVELS = ((100, 150), (50, 75), (25, 38), (13, 19))

#: The workloads of DESIGN.md, by name.
WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        MSDAWorkload("m2f_enc", 2, ((128, 128), (64, 64), (32, 32)), None, 8, 32, 4),
        MSDAWorkload("detr_enc", 2, _DETR_LEVELS, None, 8, 32, 4),
        MSDAWorkload("detr_dec", 8, _DETR_LEVELS, 900, 8, 32, 4),
        ConvWorkload("r50_dcn", 8, 256, 256, 64, 64),
        ConvWorkload("hires_dcn", 16, 64, 64, 128, 128),
        RoiPoolWorkload("roi_k512", 1, 256, 64, 64, 512),
    )
}


def _scaled(extent: int, scale: float) -> int:
    return max(1, round(extent * scale))


def _out_extent(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def to_dict(workload: Workload) -> dict[str, Any]:
    """A JSON-serialisable description of a workload (``op`` included)."""
    return {"op": workload.op, **dataclasses.asdict(workload)}


def from_dict(spec: dict[str, Any]) -> Workload:
    """Inverse of :func:`to_dict`."""
    fields = {k: v for k, v in spec.items() if k != "op"}
    if spec["op"] == "msda":
        fields["levels"] = tuple(tuple(level) for level in fields["levels"])
        return MSDAWorkload(**fields)
    if spec["op"] == "roi":
        fields["output_size"] = tuple(fields["output_size"])
        return RoiPoolWorkload(**fields)
    for key in ("kernel", "stride", "padding", "dilation"):
        fields[key] = tuple(fields[key])
    return ConvWorkload(**fields)


def differentiable(workload: Workload) -> tuple[str, ...]:
    """Names of the inputs that receive a gradient, in the order results are compared."""
    if isinstance(workload, MSDAWorkload):
        return ("value", "sampling_locations", "attention_weights")
    if isinstance(workload, RoiPoolWorkload):
        return ("input", "offset")
    names = ["input", "offset"]
    if workload.mask:
        names.append("mask")
    names.append("weight")
    if workload.bias:
        names.append("bias")
    return tuple(names)


def make_inputs(
    workload: Workload, dtype: torch.dtype, device: str | torch.device, seed: int = 0
) -> dict[str, Tensor]:
    """Random inputs of a workload, and ``grad_output``, reproducible from ``seed``.

    Parameters
    ----------
    workload : MSDAWorkload, ConvWorkload or RoiPoolWorkload
        The problem.
    dtype : torch.dtype
        Dtype of every floating tensor (drawn in float32, then rounded).
    device : str or torch.device
        Where the tensors are drawn (the generator lives there too).
    seed : int
        Seed of the generator.

    Returns
    -------
    dict of str to Tensor
        MSDA: ``value [N, S, M, D]``, ``spatial_shapes [L, 2]`` and ``level_start_index
        [L]`` (int64), ``sampling_locations [N, Q, M, L, P, 2]``, ``attention_weights
        [N, Q, M, L, P]``, ``grad_output [N, Q, M*D]``. Convolution: ``input [N, C_in, H,
        W]``, ``offset [N, 2*G*kh*kw, H_out, W_out]``, ``mask [N, G*kh*kw, H_out, W_out]``,
        ``weight [C_out, C_in, kh, kw]``, ``bias [C_out]`` (the last three when the workload
        has them), ``grad_output [N, C_out, H_out, W_out]``. RoI pooling: ``input [N, C, H,
        W]``, ``rois [K, 5]``, ``offset [K, 2, out_h, out_w]``, ``grad_output [K, C, out_h,
        out_w]``. Not requiring grad.
    """
    device = torch.device(device)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(shape, generator=generator, device=device)

    def rand(*shape: int) -> Tensor:
        return torch.rand(shape, generator=generator, device=device)

    if isinstance(workload, MSDAWorkload):
        n, q, m, d, p = (
            workload.n,
            workload.num_queries,
            workload.heads,
            workload.head_dim,
            workload.points,
        )
        levels = len(workload.levels)
        sizes = [h * w for h, w in workload.levels]
        tensors = {
            "value": randn(n, workload.positions, m, d),
            "sampling_locations": rand(n, q, m, levels, p, 2),
            "attention_weights": randn(n, q, m, levels * p).softmax(-1).view(n, q, m, levels, p),
            "grad_output": randn(n, q, m * d),
        }
        out = {name: t.to(dtype) for name, t in tensors.items()}
        out["spatial_shapes"] = torch.tensor(workload.levels, dtype=torch.int64, device=device)
        out["level_start_index"] = torch.tensor(
            [sum(sizes[:i]) for i in range(levels)], dtype=torch.int64, device=device
        )
        return out
    if isinstance(workload, RoiPoolWorkload):
        k, (oh, ow) = workload.rois, workload.output_size
        image = torch.tensor([workload.width, workload.height], device=device)
        image = image / workload.spatial_scale
        centre = rand(k, 2) * image
        log_min, log_max = math.log(workload.roi_min), math.log(workload.roi_max)
        size = torch.exp(log_min + rand(k, 2) * (log_max - log_min))
        low = torch.minimum(torch.maximum(centre - size / 2, image.new_zeros(2)), image)
        high = torch.minimum(torch.maximum(centre + size / 2, image.new_zeros(2)), image)
        batch = torch.floor(rand(k, 1) * workload.n).clamp(max=workload.n - 1)
        tensors = {
            "input": randn(workload.n, workload.channels, workload.height, workload.width),
            "rois": torch.cat([batch, low, high], 1),
            "offset": randn(k, 2, oh, ow),
            "grad_output": randn(k, workload.channels, oh, ow),
        }
        return {name: t.to(dtype) for name, t in tensors.items()}
    kh, kw = workload.kernel
    h_out, w_out = workload.out_size
    points = workload.offset_groups * kh * kw
    tensors = {
        "input": randn(workload.n, workload.c_in, workload.height, workload.width),
        "offset": 2 * randn(workload.n, 2 * points, h_out, w_out),
        "weight": randn(workload.c_out, workload.c_in, kh, kw),
        "grad_output": randn(workload.n, workload.c_out, h_out, w_out),
    }
    if workload.mask:
        tensors["mask"] = rand(workload.n, points, h_out, w_out)
    if workload.bias:
        tensors["bias"] = randn(workload.c_out)
    return {name: t.to(dtype) for name, t in tensors.items()}


def checksum(inputs: dict[str, Tensor]) -> float:
    """Sum of every input's elements in float64: the harness and the peer worker compare it
    to make sure that they generated the same inputs."""
    return sum(float(t.double().sum()) for t in inputs.values())


def msda_min_bytes(inputs: dict[str, Tensor]) -> tuple[int, int]:
    """Least bytes an MSDA implementation moves: each input read once, each output
    written once.

    Returns
    -------
    tuple of int
        ``(forward, forward + backward)``. The forward reads value, locations, weights
        and the level tables and writes the output; the backward reads the gradient of
        the output, value, locations, weights and the tables and writes the three
        gradients.
    """
    read = sum(
        inputs[name].nbytes
        for name in (
            "value",
            "sampling_locations",
            "attention_weights",
            "spatial_shapes",
            "level_start_index",
        )
    )
    out = inputs["grad_output"].nbytes
    grads = sum(
        inputs[name].nbytes for name in ("value", "sampling_locations", "attention_weights")
    )
    forward = read + out
    return forward, forward + out + read + grads
