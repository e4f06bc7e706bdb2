"""Deformable RoI pooling layers: fixed offsets, or offsets (and a mask) predicted from the
pooled features, as mmcv's ``DeformRoIPool``, ``DeformRoIPoolPack`` and
``ModulatedDeformRoIPoolPack``."""

from __future__ import annotations

from torch import Tensor, nn

from ..functional import IntPair, _check_number, _pair, deform_roi_pool

__all__ = ["DeformRoIPool2d", "DeformRoIPoolPack2d", "ModulatedDeformRoIPoolPack2d"]


def _positive(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


class DeformRoIPool2d(nn.Module):
    """Deformable RoI pooling with offsets given at each call (mmcv's ``DeformRoIPool``).

    See :func:`deformops.deform_roi_pool` for the contract; without offsets it is RoIAlign
    with ``aligned=True``.

    Parameters
    ----------
    output_size : int or (int, int)
        ``(out_h, out_w)``, bins per RoI side.
    spatial_scale : float
        Input pixels per unit of the RoI coordinates.
    sampling_ratio : int
        Samples per bin side; ``<= 0``: adaptive (``ceil(RoI side / bins)``).
    gamma : float
        Scale of the offsets (in units of the RoI's size).

    Examples
    --------
    >>> import torch
    >>> from deformops.nn import DeformRoIPool2d
    >>> pool = DeformRoIPool2d(7, spatial_scale=1 / 8)
    >>> features = torch.randn(2, 16, 32, 32)
    >>> rois = torch.tensor([[0, 16.0, 16.0, 128.0, 96.0], [1, 0.0, 0.0, 255.0, 255.0]])
    >>> pool(features, rois, 0.1 * torch.randn(2, 2, 7, 7)).shape
    torch.Size([2, 16, 7, 7])
    """

    def __init__(
        self,
        output_size: IntPair,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
    ) -> None:
        super().__init__()
        self.output_size = _pair("output_size", output_size, 1)
        self.spatial_scale = _check_number("spatial_scale", spatial_scale, positive=True)
        if not isinstance(sampling_ratio, int) or isinstance(sampling_ratio, bool):
            raise TypeError(f"sampling_ratio: expected an int, got {sampling_ratio!r}")
        self.sampling_ratio = sampling_ratio
        self.gamma = _check_number("gamma", gamma)

    def forward(self, input: Tensor, rois: Tensor, offset: Tensor | None = None) -> Tensor:
        """Pool ``input`` ``[N, C, H, W]`` over ``rois`` ``[K, 5]``.

        Parameters
        ----------
        input : Tensor
            ``[N, C, H, W]``.
        rois : Tensor
            ``[K, 5]`` rows ``(batch index, x1, y1, x2, y2)``.
        offset : Tensor, optional
            ``[K, 2, out_h, out_w]`` (x, then y), in units of ``gamma`` times the RoI size.

        Returns
        -------
        Tensor
            ``[K, C, out_h, out_w]``.
        """
        return deform_roi_pool(
            input,
            rois,
            offset,
            self.output_size,
            self.spatial_scale,
            self.sampling_ratio,
            self.gamma,
        )

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, gamma={self.gamma}"
        )


def _fc_head(in_features: int, hidden: int, out_features: int, layers: int) -> nn.Sequential:
    """``layers`` linear layers with ReLUs between them; the last one starts at zero."""
    sizes = [in_features, *[hidden] * (layers - 1), out_features]
    modules: list[nn.Module] = []
    for i in range(layers):
        if i:
            modules.append(nn.ReLU())
        modules.append(nn.Linear(sizes[i], sizes[i + 1]))
    nn.init.zeros_(modules[-1].weight)
    nn.init.zeros_(modules[-1].bias)
    return nn.Sequential(*modules)


class DeformRoIPoolPack2d(DeformRoIPool2d):
    """Deformable RoI pooling that predicts its offsets (mmcv's ``DeformRoIPoolPack``).

    Each RoI is first pooled without offsets; ``offset_fc`` (three linear layers with
    ReLUs, ``out_h*out_w*C -> deform_fc_channels -> deform_fc_channels -> 2*out_h*out_w``)
    maps the flattened result to the offsets ``[K, 2, out_h, out_w]`` of a second pooling,
    which is the output. The last layer starts at zero, so a fresh layer is RoIAlign
    (``aligned=True``). Parameter names and shapes are mmcv's, so its state dicts load.

    Parameters
    ----------
    output_size : int or (int, int)
        ``(out_h, out_w)``.
    output_channels : int
        ``C``, the channels of the input.
    deform_fc_channels : int
        Width of the hidden layers.
    spatial_scale, sampling_ratio, gamma
        As in :class:`DeformRoIPool2d`.

    Examples
    --------
    >>> import torch
    >>> from deformops.nn import DeformRoIPoolPack2d
    >>> pool = DeformRoIPoolPack2d(7, output_channels=16, deform_fc_channels=64)
    >>> rois = torch.tensor([[0, 2.0, 2.0, 20.0, 14.0], [1, 0.0, 0.0, 31.0, 31.0]])
    >>> pool(torch.randn(2, 16, 32, 32), rois).shape
    torch.Size([2, 16, 7, 7])
    """

    def __init__(
        self,
        output_size: IntPair,
        output_channels: int,
        deform_fc_channels: int = 1024,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
    ) -> None:
        super().__init__(output_size, spatial_scale, sampling_ratio, gamma)
        self.output_channels = _positive("output_channels", output_channels)
        self.deform_fc_channels = _positive("deform_fc_channels", deform_fc_channels)
        bins = self.output_size[0] * self.output_size[1]
        self.offset_fc = _fc_head(bins * output_channels, deform_fc_channels, 2 * bins, 3)

    def _pooled(self, input: Tensor, rois: Tensor) -> tuple[Tensor, Tensor]:
        """The pooling without offsets, flattened ``[K, out_h*out_w*C]``, and the pooling
        with the offsets predicted from it, ``[K, C, out_h, out_w]``."""
        if (
            not isinstance(input, Tensor)
            or input.dim() != 4
            or input.shape[1] != self.output_channels
        ):
            got = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
            raise ValueError(f"input: expected shape [N, {self.output_channels}, H, W], got {got}")
        flat = super().forward(input, rois).flatten(1)
        offset = self.offset_fc(flat).view(-1, 2, *self.output_size)
        return flat, super().forward(input, rois, offset)

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:  # type: ignore[override]
        """Pool ``input`` ``[N, C, H, W]`` over ``rois`` ``[K, 5]`` with predicted offsets.

        Returns
        -------
        Tensor
            ``[K, C, out_h, out_w]``.
        """
        return self._pooled(input, rois)[1]

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, output_channels={self.output_channels}, "
            f"deform_fc_channels={self.deform_fc_channels}"
        )


class ModulatedDeformRoIPoolPack2d(DeformRoIPoolPack2d):
    """:class:`DeformRoIPoolPack2d` with a modulation mask (mmcv's
    ``ModulatedDeformRoIPoolPack``).

    Besides the offsets, ``mask_fc`` (two linear layers with a ReLU between them and a
    sigmoid after, ``out_h*out_w*C -> deform_fc_channels -> out_h*out_w``) predicts a mask
    ``[K, 1, out_h, out_w]`` from the pooling without offsets; the output is the pooling
    with offsets times the mask. Both last layers start at zero, so a fresh layer is
    RoIAlign times 0.5. Parameter names and shapes are mmcv's.

    Examples
    --------
    >>> import torch
    >>> from deformops.nn import ModulatedDeformRoIPoolPack2d
    >>> pool = ModulatedDeformRoIPoolPack2d(7, output_channels=16, deform_fc_channels=64)
    >>> rois = torch.tensor([[0, 2.0, 2.0, 20.0, 14.0]])
    >>> pool(torch.randn(1, 16, 32, 32), rois).shape
    torch.Size([1, 16, 7, 7])
    """

    def __init__(
        self,
        output_size: IntPair,
        output_channels: int,
        deform_fc_channels: int = 1024,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
    ) -> None:
        super().__init__(
            output_size, output_channels, deform_fc_channels, spatial_scale, sampling_ratio, gamma
        )
        bins = self.output_size[0] * self.output_size[1]
        self.mask_fc = nn.Sequential(
            *_fc_head(bins * output_channels, deform_fc_channels, bins, 2), nn.Sigmoid()
        )

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:  # type: ignore[override]
        """Pool ``input`` ``[N, C, H, W]`` over ``rois`` ``[K, 5]`` with predicted offsets,
        times the predicted mask.

        Returns
        -------
        Tensor
            ``[K, C, out_h, out_w]``.
        """
        flat, pooled = self._pooled(input, rois)
        return pooled * self.mask_fc(flat).view(-1, 1, *self.output_size)
