"""``DeformAttn2d``: the multi-scale deformable attention module of Deformable DETR."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..functional import multi_scale_deformable_attention

__all__ = ["DeformAttn2d"]


def _flatten_levels(maps: Sequence[Tensor], embed_dim: int) -> tuple[Tensor, Tensor]:
    """Flatten ``L`` maps ``[N, C, H_l, W_l]`` into ``[N, S, C]`` and their ``[L, 2]`` shapes."""
    for i, level in enumerate(maps):
        if not isinstance(level, Tensor) or level.dim() != 4 or level.shape[1] != embed_dim:
            got = tuple(level.shape) if isinstance(level, Tensor) else type(level).__name__
            raise ValueError(f"value[{i}]: expected a map [N, {embed_dim}, H_l, W_l], got {got}")
    flat = torch.cat([level.flatten(2).transpose(1, 2) for level in maps], dim=1)
    shapes = torch.tensor([tuple(level.shape[-2:]) for level in maps], device=flat.device)
    return flat, shapes


def level_start_index_of(spatial_shapes: Tensor) -> Tensor:
    """Start of each level in the flattened positions: ``[L]`` from ``[L, 2]`` shapes."""
    sizes = spatial_shapes.prod(dim=1)
    return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


class DeformAttn2d(nn.Module):
    """Multi-scale deformable attention (Deformable DETR's ``MSDeformAttn``).

    Each query attends to ``num_points`` locations per head and level around its
    reference point, at offsets and with weights predicted from the query. Parameter names
    and initialisation are Deformable DETR's, so its checkpoints load unchanged.

    Parameters
    ----------
    embed_dim : int
        ``C``, divisible by ``num_heads`` (any head dim ``C / num_heads``).
    num_heads : int
        ``M``.
    num_levels : int
        ``L``.
    num_points : int
        ``P``, sampling points per head and level.

    Examples
    --------
    >>> import torch
    >>> from deformops.nn import DeformAttn2d
    >>> attn = DeformAttn2d(embed_dim=64, num_heads=4, num_levels=2, num_points=4)
    >>> maps = [torch.randn(2, 64, 16, 16), torch.randn(2, 64, 8, 8)]
    >>> query = torch.randn(2, 100, 64)
    >>> reference_points = torch.rand(2, 100, 2, 2)
    >>> attn(query, reference_points, maps).shape
    torch.Size([2, 100, 64])
    """

    def __init__(
        self, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4
    ) -> None:
        super().__init__()
        for name, value in (
            ("embed_dim", embed_dim),
            ("num_heads", num_heads),
            ("num_levels", num_levels),
            ("num_points", num_points),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim: expected a multiple of num_heads={num_heads}, got {embed_dim}"
            )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        samples = num_heads * num_levels * num_points
        self.sampling_offsets = nn.Linear(embed_dim, samples * 2)
        self.attention_weights = nn.Linear(embed_dim, samples)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's initialisation.

        Offsets start on rings around the reference point: head ``h`` points in direction
        ``2*pi*h/M`` (scaled so its larger coordinate is 1) at distance ``i+1`` for point
        ``i``; attention weights start uniform; projections are Xavier-uniform.
        """
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (
            2.0 * math.pi / self.num_heads
        )
        grid = torch.stack([angles.cos(), angles.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor | Sequence[Tensor],
        spatial_shapes: Tensor | None = None,
        level_start_index: Tensor | None = None,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend from each query to its sampled locations.

        Parameters
        ----------
        query : Tensor
            ``[N, Q, C]``.
        reference_points : Tensor
            ``[N, Q, L, 2]`` normalised ``(x, y)`` in ``[0, 1]``, or ``[N, Q, L, 4]`` boxes
            ``(cx, cy, w, h)``, whose offsets are scaled by half the box size over
            ``num_points``.
        value : Tensor or sequence of Tensor
            ``[N, S, C]`` flattened levels with ``spatial_shapes``, or a list of ``L`` maps
            ``[N, C, H_l, W_l]`` (shapes and starts then derived).
        spatial_shapes : Tensor, optional
            ``[L, 2]`` integer ``(H_l, W_l)``; required with a flattened ``value``.
        level_start_index : Tensor, optional
            ``[L]``; derived from ``spatial_shapes`` when None.
        padding_mask : Tensor, optional
            ``[N, S]`` bool, True at padded positions (their values are zeroed).

        Returns
        -------
        Tensor
            ``[N, Q, C]``.
        """
        c = self.embed_dim
        if not isinstance(query, Tensor) or query.dim() != 3 or query.shape[2] != c:
            got = tuple(query.shape) if isinstance(query, Tensor) else type(query).__name__
            raise ValueError(f"query: expected shape [N, Q, {c}], got {got}")
        if isinstance(value, Tensor):
            if spatial_shapes is None:
                raise ValueError(
                    "spatial_shapes: required when value is a flattened [N, S, C] tensor"
                )
            if value.dim() != 3 or value.shape[2] != c:
                raise ValueError(f"value: expected shape [N, S, {c}], got {tuple(value.shape)}")
        else:
            if spatial_shapes is not None or level_start_index is not None:
                raise ValueError(
                    "spatial_shapes: must be None when value is a list of maps (derived from them)"
                )
            if len(value) != self.num_levels:
                raise ValueError(f"value: expected {self.num_levels} maps, got {len(value)}")
            value, spatial_shapes = _flatten_levels(value, c)
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[0] != self.num_levels:
            raise ValueError(
                f"spatial_shapes: expected shape [{self.num_levels}, 2] (num_levels), "
                f"got {tuple(spatial_shapes.shape)}"
            )
        if level_start_index is None:
            level_start_index = level_start_index_of(spatial_shapes)
        n, q, _ = query.shape
        if (
            reference_points.dim() != 4
            or tuple(reference_points.shape[:3]) != (n, q, self.num_levels)
            or (reference_points.shape[3] not in (2, 4))
        ):
            raise ValueError(
                f"reference_points: expected shape [{n}, {q}, {self.num_levels}, 2 or 4], "
                f"got {tuple(reference_points.shape)}"
            )
        m, levels, points = self.num_heads, self.num_levels, self.num_points

        value = self.value_proj(value)
        if padding_mask is not None:
            if tuple(padding_mask.shape) != tuple(value.shape[:2]):
                raise ValueError(
                    f"padding_mask: expected shape {tuple(value.shape[:2])} [N, S], "
                    f"got {tuple(padding_mask.shape)}"
                )
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(value.shape[0], value.shape[1], m, c // m)

        offsets = self.sampling_offsets(query).view(n, q, m, levels, points, 2)
        weights = self.attention_weights(query).view(n, q, m, levels * points)
        weights = weights.softmax(-1).view(n, q, m, levels, points)
        if reference_points.shape[-1] == 2:
            normalizer = spatial_shapes.flip(-1).to(offsets.dtype)  # (W_l, H_l)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[:, None, :]
        else:
            centers = reference_points[:, :, None, :, None, :2]
            sizes = reference_points[:, :, None, :, None, 2:]
            locations = centers + offsets / points * sizes * 0.5
        out = multi_scale_deformable_attention(
            value, spatial_shapes, level_start_index, locations, weights
        )
        return self.output_proj(out)
