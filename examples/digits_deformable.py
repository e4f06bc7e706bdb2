"""Deformable versus plain convolutions on scikit-learn's digits, randomly scaled and rotated.

The 1797 8x8 digit images that ship with scikit-learn are warped onto a 32x32 canvas with
a random rotation (up to 60 degrees either way), scale (0.6 to 1.2) and shift (bilinear
resampling, so the digits stay smooth). Two copies of one small CNN are trained on the
same images in the same order: one whose two upper 3x3 convolutions are
:class:`deformops.nn.DeformConv2d`, one with plain :class:`torch.nn.Conv2d` there. Both
are evaluated on 500 held-out digits under fixed random warps, and a figure shows where
the deformable network samples the image for one unit of its last convolution.

Run from the repository root (CPU, about a minute with the default settings)::

    python examples/digits_deformable.py            # train both, check, write the figure
    python examples/digits_deformable.py --quick    # a smoke test: 2 epochs, no check

Requires scikit-learn and matplotlib (``pip install scikit-learn matplotlib``).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deformops.nn import DeformConv2d

SIZE = 32  # side of the canvas the digits are warped onto
MAX_ANGLE = math.radians(60.0)
SCALES = (0.6, 1.2)
MAX_SHIFT = 0.15  # of the half-width of the canvas
TEST_SIZE = 500
MARGIN = 6  # pixels drawn around the canvas in the figure
FIGURE = Path(__file__).resolve().parents[1] / "docs" / "img" / "digits_sampling.png"


def load_digits_split(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The digits, scaled to [0, 1], split at random into training and test sets.

    Returns
    -------
    tuple of Tensor
        ``train_images [N_train, 1, 8, 8]``, ``train_labels [N_train]``,
        ``test_images [500, 1, 8, 8]``, ``test_labels [500]``.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise SystemExit(
            "this example needs scikit-learn: pip install scikit-learn matplotlib"
        ) from error
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    test, train = order[:TEST_SIZE], order[TEST_SIZE:]
    return images[train], labels[train], images[test], labels[test]


def random_warp(images: Tensor, generator: torch.Generator) -> Tensor:
    """Rotate, scale and shift each image at random onto a ``SIZE x SIZE`` canvas.

    Parameters
    ----------
    images : Tensor
        ``[N, 1, h, w]``.
    generator : torch.Generator
        Source of the random transforms.

    Returns
    -------
    Tensor
        ``[N, 1, SIZE, SIZE]``, zero outside the warped digit.
    """
    n = images.shape[0]
    angle = (2 * torch.rand(n, generator=generator) - 1) * MAX_ANGLE
    scale = SCALES[0] + (SCALES[1] - SCALES[0]) * torch.rand(n, generator=generator)
    shift = (2 * torch.rand(n, 2, generator=generator) - 1) * MAX_SHIFT
    cos, sin = angle.cos() / scale, angle.sin() / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, [n, 1, SIZE, SIZE], align_corners=False)
    return F.grid_sample(images, grid, align_corners=False)


def _conv_block(conv: nn.Module, channels: int) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(channels), nn.ReLU())


class DigitNet(nn.Module):
    """Three 3x3 convolutions (the upper two deformable or plain), pooling and a classifier.

    Parameters
    ----------
    deformable : bool
        Whether ``block2`` and ``block3`` use :class:`~deformops.nn.DeformConv2d` (DCN v2).
    width : int
        Channels of the first convolution (then twice and four times as many).
    """

    def __init__(self, deformable: bool, width: int = 16) -> None:
        super().__init__()
        conv: Callable[[int, int], nn.Module] = (
            DeformConv2d if deformable else lambda c_in, c_out: nn.Conv2d(c_in, c_out, 3, padding=1)
        )
        self.stem = _conv_block(nn.Conv2d(1, width, 3, padding=1), width)
        self.block2 = _conv_block(conv(width, 2 * width), 2 * width)
        self.block3 = _conv_block(conv(2 * width, 4 * width), 4 * width)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 10))

    def features(self, images: Tensor) -> list[Tensor]:
        """The inputs of ``block2`` and ``block3`` and the output of ``block3``.

        ``[N, 1, 32, 32]`` images give ``[N, w, 16, 16]``, ``[N, 2w, 8, 8]`` and
        ``[N, 4w, 8, 8]``.
        """
        x2 = self.pool(self.stem(images))
        x3 = self.pool(self.block2(x2))
        return [x2, x3, self.block3(x3)]

    def forward(self, images: Tensor) -> Tensor:
        """``[N, 1, 32, 32]`` images to ``[N, 10]`` class logits."""
        return self.head(self.features(images)[-1])


def train(
    model: DigitNet,
    images: Tensor,
    labels: Tensor,
    epochs: int,
    seed: int,
    batch_size: int = 64,
    lr: float = 3e-3,
) -> None:
    """AdamW with a one-cycle schedule; every epoch draws new warps of every image."""
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(images) / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch_size):
            batch = order[start : start + batch_size]
            loss = F.cross_entropy(model(random_warp(images[batch], generator)), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    """Fraction of ``[N, 1, 32, 32]`` images classified as their label."""
    model.eval()
    return (model(images).argmax(1) == labels).float().mean().item()


def _kernel_grid() -> Tensor:
    """The 3x3 kernel points ``(dy, dx)`` in the offset order of ``deform_conv2d``: ``[9, 2]``."""
    steps = torch.arange(-1.0, 2.0)
    return torch.cartesian_prod(steps, steps)


def _offsets_at(layer: nn.Module, x: Tensor, points: Tensor) -> Tensor:
    """The offsets ``(dy, dx)`` that ``layer`` predicts from ``x`` ``[1, C, H, W]``, read
    bilinearly at ``points`` ``[P, 2]`` (pixel ``(y, x)``): ``[P, 9, 2]``; zero if plain."""
    if not isinstance(layer, DeformConv2d):
        return torch.zeros(points.shape[0], 9, 2)
    height, width = x.shape[-2:]
    field = layer.conv_offset(x)[:, :18]  # [1, 2*9, H, W]: the mask channels follow
    xy = points.flip(-1) / torch.tensor([width - 1.0, height - 1.0]) * 2 - 1
    sampled = F.grid_sample(field, xy.view(1, 1, -1, 2), align_corners=True)
    return sampled.view(9, 2, -1).permute(2, 0, 1)


@torch.no_grad()
def sampling_points(model: DigitNet, image: Tensor, unit: tuple[int, int]) -> Tensor:
    """Where ``block3``'s unit ``unit`` (a pixel of its 8x8 map) samples ``image``.

    ``block3`` samples 9 points of its input, each of which is a 2x2-pooled pixel of
    ``block2``'s output; ``block2`` samples 9 points around each, on the 2x2-pooled map of
    the stem. The composition gives 81 points in image pixel coordinates (pixel ``u`` of a
    2x2-pooled map lies at ``2u + 0.5`` of the map below). Offsets between pixels are
    interpolated bilinearly; the modulation mask is not drawn.

    Returns
    -------
    Tensor
        ``[9, 9, 2]`` image ``(y, x)``: for each point of ``block3``, the points of ``block2``.
    """
    model.eval()
    x2, x3, _ = model.features(image[None])
    unit_yx = torch.tensor([unit], dtype=torch.float32)
    level3 = unit_yx[:, None] + _kernel_grid() + _offsets_at(model.block3[0], x3, unit_yx)
    centres = 2 * level3.view(9, 2) + 0.5  # block3's points on block2's output grid
    level2 = centres[:, None] + _kernel_grid() + _offsets_at(model.block2[0], x2, centres)
    return 2 * level2 + 0.5


def central_unit(image: Tensor) -> tuple[int, int]:
    """The pixel of ``block3``'s 8x8 output map nearest the centre of mass of ``image``."""
    weights = image[0] / image[0].sum()
    ys, xs = torch.meshgrid(torch.arange(SIZE) * 1.0, torch.arange(SIZE) * 1.0, indexing="ij")
    centre = torch.stack([(weights * ys).sum(), (weights * xs).sum()])
    unit = ((centre - 1.5) / 4).round().clamp(0, SIZE // 4 - 1)  # inverse of 4u + 1.5
    return int(unit[0]), int(unit[1])


def save_figure(deformable: DigitNet, plain: DigitNet, images: Tensor, path: Path) -> None:
    """Draw the sampling points of both networks on ``images`` ``[K, 1, 32, 32]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    deformable.eval()
    plain.eval()
    fig, axes = plt.subplots(1, len(images), figsize=(1.9 * len(images), 2.4), layout="constrained")
    for ax, image in zip(axes, images, strict=True):
        unit = central_unit(image)
        regular = sampling_points(plain, image, unit).view(-1, 2)
        learned = sampling_points(deformable, image, unit)
        ax.imshow(image[0], cmap="gray_r", vmin=0, vmax=1)
        ax.add_patch(plt.Rectangle((-0.5, -0.5), SIZE, SIZE, fill=False, lw=0.8, ec="0.4"))
        ax.scatter(regular[:, 1], regular[:, 0], s=5, color="#4c72b0", label="plain: 81 points")
        ax.scatter(
            learned[..., 1].flatten(),
            learned[..., 0].flatten(),
            s=7,
            color="#dd8452",
            label="deformable: 81 points",
        )
        star = (4 * unit[1] + 1.5, 4 * unit[0] + 1.5)  # the unit's centre on the image
        ax.plot(*star, "*", ms=12, color="#c44e52", mec="white", label="unit")
        ax.set_xlim(-MARGIN - 0.5, SIZE + MARGIN - 0.5)
        ax.set_ylim(SIZE + MARGIN - 0.5, -MARGIN - 0.5)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("Where one unit of the last convolution samples the image", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--epochs", type=int, default=None, help="training epochs (default 20, 2 with --quick)"
    )
    parser.add_argument("--width", type=int, default=16, help="channels of the first conv")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figure", type=Path, default=FIGURE, help="where to write the figure")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 2 epochs (unless --epochs), no check that deformable wins",
    )
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 2 if args.quick else 20
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train both networks, print their test accuracies, save the figure.

    Returns
    -------
    dict
        Test accuracy of ``"deformable"`` and ``"plain"``.
    """
    args = parse_args(argv)
    train_images, train_labels, test_images, test_labels = load_digits_split(args.seed)
    test_warped = random_warp(test_images, torch.Generator().manual_seed(args.seed + 1))
    models: dict[str, DigitNet] = {}
    results: dict[str, float] = {}
    for name in ("plain", "deformable"):
        torch.manual_seed(args.seed)
        models[name] = DigitNet(deformable=name == "deformable", width=args.width)
        start = time.perf_counter()
        train(models[name], train_images, train_labels, args.epochs, args.seed)
        results[name] = accuracy(models[name], test_warped, test_labels)
        print(
            f"{name:>10}: test accuracy {results[name]:.3f} "
            f"({args.epochs} epochs, {time.perf_counter() - start:.1f} s)",
            flush=True,
        )
    save_figure(models["deformable"], models["plain"], test_warped[:4], args.figure)
    print(f"figure: {args.figure}")
    if not args.quick and results["deformable"] <= results["plain"]:
        raise SystemExit("the deformable network did not beat the plain one")
    return results


if __name__ == "__main__":
    main()
