"""Draw the sampling-grid figures of the documentation into ``docs/img/``.

Run ``python docs/make_figures.py`` after changing this file and commit the PNGs. The
figures follow the operator contracts of the docs pages (pixel ``(y, x)`` coordinates for
the deformable convolution, normalised ``(x, y)`` for the attention); the points are drawn
from a seeded generator, so every run writes the same images.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

IMG = Path(__file__).resolve().parent / "img"

REGULAR = "#4c72b0"
DEFORMED = "#dd8452"
CORNER = "#55a868"
OUTSIDE = "#c44e52"
REFERENCE = "#8172b2"


def _save(fig: Figure, name: str) -> Path:
    """Write ``fig`` as ``img/name`` without metadata that changes between runs."""
    IMG.mkdir(exist_ok=True)
    path = IMG / name
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return path


def _pixel_grid(ax: Axes, height: int, width: int) -> None:
    """Pixel centres at integer ``(x, y)``, y pointing down, as in an image."""
    ys, xs = np.mgrid[0:height, 0:width]
    ax.scatter(xs, ys, s=6, color="0.6", zorder=1)
    ax.add_patch(
        plt.Rectangle((-0.5, -0.5), width, height, fill=False, lw=1.0, ec="0.3", ls="--", zorder=1)
    )
    ax.set_xlim(-1.5, width + 0.5)
    ax.set_ylim(height + 0.5, -1.5)
    ax.set_aspect("equal")
    ax.set_xlabel("x (column)")
    ax.set_ylabel("y (row)")


def _corners(ax: Axes, y: float, x: float, height: int, width: int, label: bool) -> None:
    """The four bilinear corners of ``(y, x)`` with their weights; red where outside the map."""
    y0, x0 = np.floor(y), np.floor(x)
    ly, lx = y - y0, x - x0
    for cy, wy in ((y0, 1 - ly), (y0 + 1, ly)):
        for cx, wx in ((x0, 1 - lx), (x0 + 1, lx)):
            inside = 0 <= cy <= height - 1 and 0 <= cx <= width - 1
            color = CORNER if inside else OUTSIDE
            ax.plot([x, cx], [y, cy], color=color, lw=0.8, zorder=2)
            ax.scatter([cx], [cy], s=40, marker="s", color=color, zorder=3)
            if label:
                text = f"{wy * wx:.2f}" if inside else "0 (outside)"
                dx = -0.12 if cx == x0 else 0.12
                dy = -0.15 if cy == y0 else 0.3
                ha = "right" if cx == x0 else "left"
                ax.text(cx + dx, cy + dy, text, color=color, fontsize=8, ha=ha)


def deform_conv2d_figure() -> Path:
    """A 3x3 kernel's regular grid and its deformed sample points for one output pixel."""
    height, width = 6, 9
    kh = kw = 3
    stride, padding, dilation = 1, 1, 1
    ho, wo = 1, 5
    rng = np.random.default_rng(0)
    dy = rng.normal(0.0, 0.4, (kh, kw))
    dx = rng.normal(0.0, 0.4, (kh, kw))
    dy[0, 0], dx[0, 0] = -0.6, -1.3  # above the map: two of its corners are outside
    dy[2, 0], dx[2, 0] = 0.35, -1.4
    i, j = np.mgrid[0:kh, 0:kw]
    base_y = ho * stride - padding + i * dilation
    base_x = wo * stride - padding + j * dilation
    y, x = base_y + dy, base_x + dx

    fig, ax = plt.subplots(figsize=(7.0, 5.0))
    _pixel_grid(ax, height, width)
    ax.scatter(base_x, base_y, s=60, facecolor="none", edgecolor=REGULAR, lw=1.5, zorder=4)
    for k in range(kh * kw):
        a, b = divmod(k, kw)
        ax.annotate(
            "",
            xy=(x[a, b], y[a, b]),
            xytext=(base_x[a, b], base_y[a, b]),
            arrowprops={"arrowstyle": "->", "color": DEFORMED, "lw": 1.0},
            zorder=4,
        )
        ax.text(base_x[a, b] + 0.1, base_y[a, b] + 0.32, f"k={k}", fontsize=7, color=REGULAR)
    ax.scatter(x, y, s=40, color=DEFORMED, zorder=5)
    _corners(ax, y[0, 0], x[0, 0], height, width, label=True)
    _corners(ax, y[2, 0], x[2, 0], height, width, label=True)
    handles = [
        plt.Line2D(
            [], [], ls="", marker="o", mfc="none", mec=REGULAR, label="regular grid (offset 0)"
        ),
        plt.Line2D(
            [], [], ls="", marker="o", color=DEFORMED, label="sample point (y + dy, x + dx)"
        ),
        plt.Line2D([], [], ls="", marker="s", color=CORNER, label="bilinear corner (weight)"),
        plt.Line2D([], [], ls="", marker="s", color=OUTSIDE, label="corner outside: contributes 0"),
        plt.Line2D([], [], ls="", marker=".", color="0.6", label="input pixel"),
    ]
    ax.legend(
        handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False
    )
    ax.set_title(
        f"deform_conv2d: output pixel (ho, wo) = ({ho}, {wo}), 3x3 kernel, "
        f"stride {stride}, padding {padding}",
        fontsize=9,
    )
    return _save(fig, "deform_conv2d_sampling.png")


def msda_figure() -> Path:
    """One query's reference point and its P sampling points on each of L levels (one head)."""
    levels = [(8, 12), (4, 6), (2, 3)]
    points = 4
    reference = np.array([0.42, 0.55])  # normalised (x, y)
    rng = np.random.default_rng(7)
    fig, axes = plt.subplots(1, len(levels), figsize=(11.0, 3.2))
    for level, (ax, (h, w)) in enumerate(zip(axes, levels, strict=True)):
        offsets = rng.normal(0.0, 1.2, (points, 2))  # in pixels of this level, as (x, y)
        locations = reference + offsets / np.array([w, h])
        weights = rng.random(points)
        weights /= weights.sum()
        ax.set_xlim(-0.08, 1.08)
        ax.set_ylim(1.08, -0.08)
        ax.set_aspect(h / w)  # square pixels
        for col in range(1, w):
            ax.plot([col / w, col / w], [0, 1], color="0.85", lw=0.6, zorder=0)
        for row in range(1, h):
            ax.plot([0, 1], [row / h, row / h], color="0.85", lw=0.6, zorder=0)
        ys, xs = np.mgrid[0:h, 0:w]
        ax.scatter((xs + 0.5) / w, (ys + 0.5) / h, s=6, color="0.6", zorder=1)
        ax.add_patch(plt.Rectangle((0, 0), 1, 1, fill=False, ec="0.3", lw=1.0))
        for (px, py), weight in zip(locations, weights, strict=True):
            ax.annotate(
                "",
                xy=(px, py),
                xytext=tuple(reference),
                arrowprops={"arrowstyle": "->", "color": DEFORMED, "lw": 0.9},
            )
            ax.scatter([px], [py], s=300 * weight, color=DEFORMED, zorder=3)
        ax.scatter(*reference, s=120, marker="*", color=REFERENCE, zorder=4)
        x_pix, y_pix = reference[0] * w - 0.5, reference[1] * h - 0.5
        ax.set_title(
            f"level {level}: H={h}, W={w}\nreference (x, y) -> pixel ({x_pix:.2f}, {y_pix:.2f})",
            fontsize=9,
        )
        ax.set_xticks([0, 0.5, 1])
        ax.set_yticks([0, 0.5, 1])
        ax.set_xlabel("normalised x")
    axes[0].set_ylabel("normalised y")
    handles = [
        plt.Line2D([], [], ls="", marker="*", ms=10, color=REFERENCE, label="reference point"),
        plt.Line2D(
            [], [], ls="", marker="o", color=DEFORMED, label="sampling point (size: weight)"
        ),
        plt.Line2D([], [], ls="", marker=".", color="0.6", label="pixel centre ((i+0.5)/W)"),
        plt.Line2D([], [], color="0.3", label="map edge (0 and 1)"),
    ]
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=4,
        fontsize=8,
        frameon=False,
        bbox_to_anchor=(0.5, -0.06),
    )
    fig.suptitle(
        f"multi_scale_deformable_attention: one query, one head, "
        f"L={len(levels)} levels, P={points} points",
        fontsize=10,
        y=1.02,
    )
    return _save(fig, "msda_sampling.png")


def main() -> None:
    """Write every figure and print its path."""
    for make in (deform_conv2d_figure, msda_figure):
        print(make())


if __name__ == "__main__":
    main()
