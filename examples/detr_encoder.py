"""A small Deformable-DETR-style encoder trained for a few steps on random multi-scale features.

Each encoder layer is Deformable DETR's: multi-scale deformable self-attention
(:class:`deformops.nn.DeformAttn2d`, every pixel of every level a query, its own position
the reference point on every level), then a feed-forward network, each followed by a
residual connection and LayerNorm. Queries carry a sine position embedding plus a learned
embedding of their level.

The task needs the attention to learn where to look: the output at every position must be
the input feature of the finest level a few pixels away from it, in a fixed direction
(``SHIFT``). A fresh layer samples on rings around its reference point: to copy that
feature, its sampling offsets have to learn the shift.

Run from the repository root (CPU, a few seconds)::

    python examples/detr_encoder.py             # 300 steps
    python examples/detr_encoder.py --quick     # 20 steps, for CI
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deformops.nn import DeformAttn2d

LEVELS = ((16, 16), (8, 8), (4, 4))  # (H_l, W_l), finest first
SHIFT = (3.0, -2.0)  # (dx, dy) in pixels of the finest level


class EncoderLayer(nn.Module):
    """Deformable self-attention and a feed-forward network, post-norm, as in Deformable DETR.

    Parameters
    ----------
    dim : int
        ``C``.
    heads, levels, points : int
        Of :class:`~deformops.nn.DeformAttn2d`.
    ffn_dim : int
        Hidden width of the feed-forward network.
    """

    def __init__(self, dim: int, heads: int, levels: int, points: int, ffn_dim: int) -> None:
        super().__init__()
        self.attn = DeformAttn2d(dim, heads, levels, points)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Linear(ffn_dim, dim))
        self.norm2 = nn.LayerNorm(dim)

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
    ) -> Tensor:
        """``src`` and ``pos`` ``[N, S, C]``, ``reference_points`` ``[N, S, L, 2]`` to ``[N, S, C]``."""
        attended = self.attn(src + pos, reference_points, src, spatial_shapes, level_start_index)
        src = self.norm1(src + attended)
        return self.norm2(src + self.ffn(src))


def sine_embedding(points: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """Sine-cosine embedding of normalised ``(x, y)`` ``[..., 2]``: ``[..., dim]``."""
    frequencies = temperature ** (torch.arange(dim // 4, dtype=points.dtype) / (dim // 4))
    angles = points[..., None] * (2 * math.pi) / frequencies  # [..., 2, dim/4]
    return torch.cat([angles.sin(), angles.cos()], -1).flatten(-2)


def level_grid(height: int, width: int) -> Tensor:
    """Normalised ``(x, y)`` centres of the pixels of a level, row-major: ``[H*W, 2]``."""
    ys, xs = torch.meshgrid(
        (torch.arange(height) + 0.5) / height, (torch.arange(width) + 0.5) / width, indexing="ij"
    )
    return torch.stack([xs, ys], -1).flatten(0, 1)


class Encoder(nn.Module):
    """A stack of :class:`EncoderLayer` over flattened levels, and a linear read-out.

    Parameters
    ----------
    dim : int
        Channels ``C`` of every level.
    depth : int
        Number of layers.
    heads, points : int
        Of every layer's :class:`~deformops.nn.DeformAttn2d`.
    """

    def __init__(self, dim: int = 32, depth: int = 2, heads: int = 4, points: int = 4) -> None:
        super().__init__()
        levels = len(LEVELS)
        self.layers = nn.ModuleList(
            EncoderLayer(dim, heads, levels, points, 2 * dim) for _ in range(depth)
        )
        self.level_embed = nn.Parameter(torch.randn(levels, dim) * 0.02)
        self.readout = nn.Linear(dim, dim)
        shapes = torch.tensor(LEVELS)
        sizes = shapes.prod(1)
        self.register_buffer("spatial_shapes", shapes, persistent=False)
        self.register_buffer("level_start_index", sizes.cumsum(0) - sizes, persistent=False)
        grid = torch.cat([level_grid(h, w) for h, w in LEVELS])  # [S, 2]
        self.register_buffer("grid", grid, persistent=False)

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        """``L`` maps ``[N, C, H_l, W_l]`` (sizes ``LEVELS``) to ``[N, S, C]``."""
        src = torch.cat([level.flatten(2).transpose(1, 2) for level in maps], 1)
        level_of = torch.repeat_interleave(
            torch.arange(len(maps), device=src.device), self.spatial_shapes.prod(1)
        )
        pos = sine_embedding(self.grid, src.shape[-1]) + self.level_embed[level_of]
        n, s = src.shape[:2]
        reference_points = self.grid[None, :, None].expand(n, s, len(maps), 2)
        for layer in self.layers:
            src = layer(src, pos, reference_points, self.spatial_shapes, self.level_start_index)
        return self.readout(src)


def shifted_targets(finest: Tensor, grid: Tensor) -> Tensor:
    """The finest level ``[N, C, H, W]`` read bilinearly at ``grid + SHIFT``: ``[N, S, C]``."""
    height, width = finest.shape[-2:]
    shift = torch.tensor(SHIFT) / torch.tensor([width, height])
    xy = (grid + shift) * 2 - 1  # grid_sample's [-1, 1], align_corners=False
    sampled = F.grid_sample(finest, xy.expand(finest.shape[0], 1, -1, 2), align_corners=False)
    return sampled[:, :, 0].transpose(1, 2)


def random_maps(batch: int, dim: int, generator: torch.Generator) -> list[Tensor]:
    """Smooth random features of unit variance for every level: ``[N, C, H_l, W_l]`` each.

    Smoothness gives the sampling locations a gradient towards where they should look.
    """
    maps = []
    for h, w in LEVELS:
        level = torch.randn(batch, dim, h, w, generator=generator)
        for _ in range(2):
            level = F.avg_pool2d(level, 3, stride=1, padding=1, count_include_pad=False)
        maps.append(level / level.std())
    return maps


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="default 300, 20 with --quick")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a short run (20 steps)")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 20 if args.quick else 300
    return args


def main(argv: Sequence[str] | None = None) -> list[float]:
    """Train the encoder on fresh random features at every step; print the loss.

    Returns
    -------
    list of float
        The loss of every step.
    """
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = Encoder(args.dim, args.depth)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses = []
    every = max(1, args.steps // 10)
    start = time.perf_counter()
    for step in range(args.steps):
        maps = random_maps(args.batch, args.dim, generator)
        loss = F.mse_loss(model(maps), shifted_targets(maps[0], model.grid))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % every == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}", flush=True)
    print(
        f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {args.steps} steps "
        f"({time.perf_counter() - start:.1f} s)"
    )
    return losses


if __name__ == "__main__":
    main()
