"""Layers with the constructors, forward signatures and state dicts of mmcv's.

mmcv's deformable layers keep their parameters under the names of
:class:`deformops.nn.DeformConv2d` and :class:`deformops.nn.DeformAttn2d`, so their state
dicts load into those layers unchanged. The classes here add what differs around the
parameters, so that an mmcv/mmdet model can swap its layers without other changes:

- :class:`ModulatedDeformConv2dPack` (mmcv's DCNv2) and :class:`DeformConv2dPack` (DCN):
  mmcv's argument names and defaults (``padding=0``, ``deform_groups``; no bias in DCN v1)
  and mmcv's weight initialisation;
- :class:`MultiScaleDeformableAttention`: mmcv's arguments (``embed_dims``,
  ``batch_first``, ``dropout``) and ``forward(query, key, value, identity, query_pos,
  key_padding_mask, reference_points, spatial_shapes, level_start_index)``, with mmcv's
  sequence-first layout by default, positional encoding added to the query, dropout on
  the output and the residual ``identity`` added.

This module does not import mmcv.

Examples
--------
>>> import torch
>>> from deformops.integrations.mmcv import ModulatedDeformConv2dPack
>>> layer = ModulatedDeformConv2dPack(16, 32, kernel_size=3, padding=1, deform_groups=2)
>>> sorted(layer.state_dict())
['bias', 'conv_offset.bias', 'conv_offset.weight', 'weight']
>>> layer(torch.randn(2, 16, 20, 24)).shape
torch.Size([2, 32, 20, 24])
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from ..nn import DeformAttn2d, DeformConv2d

__all__ = ["DeformConv2dPack", "ModulatedDeformConv2dPack", "MultiScaleDeformableAttention"]

IntPair = int | tuple[int, int]


class _DeformConv2dPack(DeformConv2d):
    """mmcv's name of ``offset_groups`` on :class:`deformops.nn.DeformConv2d`."""

    @property
    def deform_groups(self) -> int:
        """mmcv's name of ``offset_groups``."""
        return self.offset_groups

    def init_weights(self) -> None:
        """mmcv's name of ``reset_parameters`` (mmengine calls it when it initialises a model)."""
        self.reset_parameters()


class ModulatedDeformConv2dPack(_DeformConv2dPack):
    """mmcv's ``ModulatedDeformConv2dPack`` (registered there as ``DCNv2``) on deformops.

    DCN v2: ``conv_offset`` predicts ``3*deform_groups*kh*kw`` channels from the input,
    the first two thirds offsets and the last third mask logits (a sigmoid).

    Parameters
    ----------
    in_channels, out_channels : int
        ``C_in``, ``C_out``.
    kernel_size, stride, padding, dilation : int or (int, int)
        As in :class:`torch.nn.Conv2d` (``padding`` defaults to 0, as in mmcv).
    groups : int
        Convolution groups.
    deform_groups : int
        Offset groups ``G`` (``offset_groups`` of :class:`deformops.nn.DeformConv2d`).
    bias : bool
        Whether the layer has a bias (mmcv's default: True).

    Notes
    -----
    ``weight`` is initialised uniform in ``±1/sqrt(C_in*kh*kw)`` and ``bias`` at zero, as in
    mmcv; ``conv_offset`` at zero.

    Examples
    --------
    >>> import torch
    >>> from deformops.integrations.mmcv import ModulatedDeformConv2dPack
    >>> ModulatedDeformConv2dPack(8, 8, 3, padding=1)(torch.randn(1, 8, 9, 9)).shape
    torch.Size([1, 8, 9, 9])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            offset_groups=deform_groups,
            bias=bias,
            modulated=True,
        )

    def reset_parameters(self) -> None:
        """mmcv's initialisation: uniform ``weight``, zero ``bias`` and ``conv_offset``."""
        bound = 1.0 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)


class DeformConv2dPack(_DeformConv2dPack):
    """mmcv's ``DeformConv2dPack`` (registered there as ``DCN``) on deformops.

    DCN v1: ``conv_offset`` predicts ``2*deform_groups*kh*kw`` offset channels from the
    input; no mask and, as in mmcv, no bias.

    Parameters
    ----------
    in_channels, out_channels : int
        ``C_in``, ``C_out``.
    kernel_size, stride, padding, dilation : int or (int, int)
        As in :class:`torch.nn.Conv2d` (``padding`` defaults to 0, as in mmcv).
    groups : int
        Convolution groups.
    deform_groups : int
        Offset groups ``G``.
    bias : bool
        Must be False, as in mmcv.

    Notes
    -----
    ``weight`` is initialised Kaiming-uniform for a ReLU, as in mmcv; ``conv_offset`` at
    zero.

    Examples
    --------
    >>> import torch
    >>> from deformops.integrations.mmcv import DeformConv2dPack
    >>> DeformConv2dPack(8, 4, 3, stride=2, padding=1)(torch.randn(1, 8, 9, 9)).shape
    torch.Size([1, 4, 5, 5])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: bool = False,
    ) -> None:
        if bias:
            raise ValueError("bias: mmcv's DeformConv2dPack has no bias; expected False, got True")
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            offset_groups=deform_groups,
            bias=False,
            modulated=False,
        )

    def reset_parameters(self) -> None:
        """mmcv's initialisation: Kaiming-uniform (ReLU) ``weight``, zero ``conv_offset``."""
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)


class MultiScaleDeformableAttention(DeformAttn2d):
    """mmcv's ``MultiScaleDeformableAttention`` on deformops.

    The parameters (``sampling_offsets``, ``attention_weights``, ``value_proj``,
    ``output_proj``) and their initialisation are those of
    :class:`deformops.nn.DeformAttn2d`, which are mmcv's.

    Parameters
    ----------
    embed_dims : int
        ``C``, divisible by ``num_heads``.
    num_heads, num_levels, num_points : int
        ``M``, ``L``, ``P``.
    im2col_step : int
        No effect (mmcv's CUDA batching step); accepted for configs.
    dropout : float
        Dropout on the output, before the residual is added.
    batch_first : bool
        Layout of ``query``, ``value``, ``identity`` and the output: ``[N, Q, C]`` when
        True, ``[Q, N, C]`` when False (mmcv's default).
    norm_cfg : dict, optional
        No effect (unused in mmcv too); accepted for configs.
    value_proj_ratio : float
        Must be 1.0: mmcv's narrower value projection is not supported.

    Examples
    --------
    >>> import torch
    >>> from deformops.integrations.mmcv import MultiScaleDeformableAttention
    >>> attn = MultiScaleDeformableAttention(64, num_heads=4, num_levels=2, batch_first=True)
    >>> shapes = torch.tensor([[8, 8], [4, 4]])
    >>> value = torch.randn(2, 80, 64)  # [N, S, C]
    >>> query = torch.randn(2, 10, 64)
    >>> attn(query, value=value, reference_points=torch.rand(2, 10, 2, 2),
    ...      spatial_shapes=shapes).shape
    torch.Size([2, 10, 64])
    """

    def __init__(
        self,
        embed_dims: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        im2col_step: int = 64,
        dropout: float = 0.1,
        batch_first: bool = False,
        norm_cfg: dict | None = None,
        value_proj_ratio: float = 1.0,
    ) -> None:
        if value_proj_ratio != 1.0:
            raise ValueError(
                f"value_proj_ratio: only 1.0 is supported (value_proj of C to C), got "
                f"{value_proj_ratio}"
            )
        super().__init__(embed_dims, num_heads, num_levels, num_points)
        self.im2col_step = im2col_step
        self.dropout = nn.Dropout(dropout)
        self.batch_first = batch_first
        self.norm_cfg = norm_cfg

    @property
    def embed_dims(self) -> int:
        """mmcv's name of ``embed_dim``."""
        return self.embed_dim

    def init_weights(self) -> None:
        """mmcv's name of ``reset_parameters``: Deformable DETR's initialisation.

        mmdet's detectors call it after a Xavier initialisation of the whole transformer,
        on the layers that are instances of mmcv's class: after a swap, call it yourself
        (``for m in model.modules(): if isinstance(m, MultiScaleDeformableAttention):
        m.init_weights()``) when training from scratch.
        """
        self.reset_parameters()

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        identity: Tensor | None = None,
        query_pos: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        reference_points: Tensor | None = None,
        spatial_shapes: Tensor | None = None,
        level_start_index: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """mmcv's forward.

        Parameters
        ----------
        query : Tensor
            ``[Q, N, C]`` (``[N, Q, C]`` with ``batch_first``).
        key : Tensor, optional
            Unused, as in mmcv.
        value : Tensor, optional
            ``[S, N, C]`` (``[N, S, C]`` with ``batch_first``); ``query`` when None.
        identity : Tensor, optional
            Added to the output, in ``query``'s layout; ``query`` when None.
        query_pos : Tensor, optional
            Positional encoding added to ``query`` (not to ``identity``).
        key_padding_mask : Tensor, optional
            ``[N, S]`` bool, True at padded positions.
        reference_points : Tensor
            ``[N, Q, L, 2]`` normalised ``(x, y)`` or ``[N, Q, L, 4]`` boxes.
        spatial_shapes : Tensor
            ``[L, 2]`` integer ``(H_l, W_l)``.
        level_start_index : Tensor, optional
            ``[L]``; derived from ``spatial_shapes`` when None.
        **kwargs
            Ignored, as in mmcv.

        Returns
        -------
        Tensor
            In ``query``'s layout.
        """
        if reference_points is None or spatial_shapes is None:
            raise ValueError(
                "reference_points, spatial_shapes: both are required (got "
                f"{type(reference_points).__name__}, {type(spatial_shapes).__name__})"
            )
        value = query if value is None else value
        identity = query if identity is None else identity
        if query_pos is not None:
            query = query + query_pos
        if not self.batch_first:
            query, value = query.transpose(0, 1), value.transpose(0, 1)
        out = super().forward(
            query, reference_points, value, spatial_shapes, level_start_index, key_padding_mask
        )
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self.dropout(out) + identity
