"""``DeformConv2d``: a deformable convolution layer with its own offset (and mask) predictor."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from ..functional import deform_conv2d

__all__ = ["DeformConv2d"]


class DeformConv2d(nn.Module):
    """Deformable convolution, DCN v2 (``modulated=True``) or v1, with built-in offsets.

    The offsets (and, when modulated, the mask) are predicted from the input by
    ``conv_offset``, a :class:`torch.nn.Conv2d` with the layer's kernel, stride, padding and
    dilation and ``3*G*kh*kw`` output channels (``2*G*kh*kw`` when not modulated): the first
    ``2*G*kh*kw`` are the offsets, the last ``G*kh*kw`` the mask logits, passed through a
    sigmoid. ``conv_offset`` starts at zero, so a fresh layer is the plain convolution,
    scaled by 0.5 when modulated. Names and layouts are those of mmcv's
    ``ModulatedDeformConv2dPack`` / ``DeformConv2dPack``, so their state dicts load.

    Parameters
    ----------
    in_channels : int
        ``C_in``.
    out_channels : int, optional
        ``C_out``; defaults to ``in_channels``.
    kernel_size : int or (int, int)
        ``(kh, kw)``.
    stride : int or (int, int)
        As in :class:`torch.nn.Conv2d`.
    dilation : int or (int, int)
        As in :class:`torch.nn.Conv2d`.
    padding : int or (int, int), optional
        Defaults to ``dilation*(k-1)//2`` per side: "same" size for stride 1 and odd kernels.
    groups : int
        Convolution groups; divides ``C_in`` and ``C_out``.
    offset_groups : int
        ``G``: groups of input channels that share offsets and mask; divides ``C_in``.
    bias : bool
        Whether the layer has a bias.
    modulated : bool
        DCN v2 (predicted mask) when True, DCN v1 when False.

    Examples
    --------
    >>> import torch
    >>> from deformops.nn import DeformConv2d
    >>> DeformConv2d(16)(torch.randn(4, 16, 32, 64)).shape
    torch.Size([4, 16, 32, 64])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        kernel_size: int | tuple[int, int] = 3,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | None = None,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        offset_groups: int = 1,
        bias: bool = True,
        modulated: bool = True,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        for name, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("groups", groups),
            ("offset_groups", offset_groups),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups: expected a divisor of in_channels={in_channels} and "
                f"out_channels={out_channels}, got {groups}"
            )
        if in_channels % offset_groups:
            raise ValueError(
                f"offset_groups: expected a divisor of in_channels={in_channels}, got {offset_groups}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.dilation = _pair(dilation)
        if padding is None:
            padding = tuple(
                d * (k - 1) // 2 for d, k in zip(self.dilation, self.kernel_size, strict=True)
            )
        self.padding = _pair(padding)
        self.groups = groups
        self.offset_groups = offset_groups
        self.modulated = modulated
        kh, kw = self.kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kh, kw))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.conv_offset = nn.Conv2d(
            in_channels,
            (3 if modulated else 2) * offset_groups * kh * kw,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise ``weight`` and ``bias`` as :class:`torch.nn.Conv2d`; zero ``conv_offset``."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.weight.shape[2] * self.weight.shape[3]
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(
        self, input: Tensor, offset: Tensor | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """Apply the layer.

        Parameters
        ----------
        input : Tensor
            ``[N, C_in, H, W]``.
        offset : Tensor, optional
            ``[N, 2*G*kh*kw, H_out, W_out]``; predicted by ``conv_offset`` when None.
        mask : Tensor, optional
            ``[N, G*kh*kw, H_out, W_out]``; predicted with the offsets when ``offset`` is
            None and the layer is modulated; used as given otherwise.

        Returns
        -------
        Tensor
            ``[N, C_out, H_out, W_out]``.
        """
        if not isinstance(input, Tensor) or input.dim() != 4 or input.shape[1] != self.in_channels:
            got = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
            raise ValueError(f"input: expected shape [N, {self.in_channels}, H, W], got {got}")
        if offset is None:
            if mask is not None:
                raise ValueError("mask: a mask was given without offset; pass both or neither")
            predicted = self.conv_offset(input)
            if self.modulated:
                k = self.offset_groups * self.kernel_size[0] * self.kernel_size[1]
                offset, logits = predicted.split([2 * k, k], dim=1)
                mask = torch.sigmoid(logits)
            else:
                offset = predicted
        return deform_conv2d(
            input, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, offset_groups={self.offset_groups}, "
            f"bias={self.bias is not None}, modulated={self.modulated}"
        )
