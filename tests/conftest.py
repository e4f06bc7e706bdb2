"""Shared fixtures: backends, seeded RNG, dtypes and random operator inputs."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import deformops

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)

# Relative-norm tolerances against float64 computed from the same (rounded) inputs.
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}

BACKENDS = ("reference", "native")

# Devices to parametrize over: CUDA where there is one (the GPU host runs the ``cuda``
# marked tests; elsewhere they show as skipped).
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]


def _native_unavailable(reason: str) -> None:
    """Fails in CI (native must be tested there), skips locally."""
    message = f"native backend unavailable on the CPU: {reason}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (env CI is set: the native backend must be tested)")
    pytest.skip(message)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Selects each backend in turn through ``deformops.set_backend``."""
    name = request.param
    try:
        try:
            deformops.set_backend(name)
            active = deformops.backend("cpu")
        except Exception as error:  # a failed build must not pass as a skip in CI
            if name != "native":
                raise
            _native_unavailable(f"selecting it raised {error!r}")
        if active != name:
            if name == "native":
                _native_unavailable(f"deformops.backend('cpu') is {active!r}")
            pytest.fail(f"set_backend({name!r}) left backend('cpu') = {active!r}")
        yield name
    finally:
        deformops.set_backend(None)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same RNG state."""
    torch.manual_seed(0)


@pytest.fixture(params=FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return request.param


@pytest.fixture(params=HALF_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def half_dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return request.param


def make_conv_inputs(
    n: int = 2,
    c_in: int = 4,
    c_out: int = 6,
    h: int = 5,
    w: int = 7,
    kh: int = 3,
    kw: int = 3,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 1,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    offset_groups: int = 1,
    mask: bool = True,
    bias: bool = True,
    offsets: str = "random",
    offset_scale: float = 2.0,
) -> dict[str, Any]:
    """Random float64 arguments of ``deform_conv2d`` (keyword names of the public API).

    ``offsets``: ``"random"`` (``offset_scale * randn`` pixels, so some points fall outside
    the map), ``"far"`` (also points 3 to 6 pixels outside), ``"integer"`` (integers and
    half-integers in [-3, 3]: points exactly on pixel centres, between pixels and on the
    borders), ``"near_edges"`` (integers plus at most 1e-6: points a rounding error away from
    a pixel edge, where the offset gradient jumps: float32 sums of pixel index and offset
    round across the edge), or ``"zero"``.
    """

    def pair(v: int | tuple[int, int]) -> tuple[int, int]:
        return (v, v) if isinstance(v, int) else v

    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    h_out = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    w_out = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    k = kh * kw
    shape = (n, 2 * offset_groups * k, h_out, w_out)
    f64 = torch.float64
    if offsets == "random":
        offset = offset_scale * torch.randn(shape, dtype=f64)
    elif offsets == "far":
        sign = torch.randint(0, 2, shape).to(f64) * 2 - 1
        offset = torch.where(
            torch.rand(shape) < 0.5,
            sign * (h + w + 3 + 3 * torch.rand(shape, dtype=f64)),
            offset_scale * torch.randn(shape, dtype=f64),
        )
    elif offsets == "integer":
        offset = torch.randint(-6, 7, shape).to(f64) / 2
    elif offsets == "near_edges":
        offset = torch.randint(-3, 4, shape).to(f64) + (2 * torch.rand(shape, dtype=f64) - 1) * 1e-6
    elif offsets == "zero":
        offset = torch.zeros(shape, dtype=f64)
    else:
        raise ValueError(offsets)
    return {
        "input": torch.randn(n, c_in, h, w, dtype=f64),
        "offset": offset,
        "weight": torch.randn(c_out, c_in // groups, kh, kw, dtype=f64),
        "bias": torch.randn(c_out, dtype=f64) if bias else None,
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "mask": torch.rand(n, offset_groups * k, h_out, w_out, dtype=f64) if mask else None,
    }


def make_msda_inputs(
    n: int = 2,
    levels: tuple[tuple[int, int], ...] = ((4, 6), (3, 2), (1, 1)),
    m: int = 2,
    d: int = 4,
    q: int = 5,
    p: int = 3,
    locations: str = "random",
) -> dict[str, Any]:
    """Random float64 arguments of ``multi_scale_deformable_attention`` (keyword names).

    ``locations``: ``"random"`` (uniform in [-0.6, 1.6], about 40% of the points outside
    the map, some by several pixels) or ``"exact"`` (pixel centres, half-pixels and the
    borders -1, -0.5, W-0.5, W; exact in binary when the sizes are powers of two) or
    ``"near_edges"`` (pixel centres moved by at most 1e-6 pixels: float32 products of location
    and map size round across the pixel edge, where the location gradient jumps).
    """
    shapes = torch.tensor(levels, dtype=torch.int64)
    sizes = [h * w for h, w in levels]
    starts = torch.tensor([sum(sizes[:i]) for i in range(len(sizes))], dtype=torch.int64)
    loc_shape = (n, q, m, len(levels), p, 2)
    if locations == "random":
        loc = torch.rand(loc_shape, dtype=torch.float64) * 2.2 - 0.6
    elif locations == "exact":
        extent = shapes.flip(-1).to(torch.float64)[None, None, None, :, None, :]  # (W, H)
        pixel = torch.randint(-4, 2 * int(shapes.max()) + 3, loc_shape).to(torch.float64) / 2
        loc = (pixel + 0.5) / extent
    elif locations == "near_edges":
        extent = shapes.flip(-1).to(torch.float64)[None, None, None, :, None, :]  # (W, H)
        pixel = torch.floor(torch.rand(loc_shape, dtype=torch.float64) * extent)
        loc = (pixel + 0.5 + (2 * torch.rand(loc_shape, dtype=torch.float64) - 1) * 1e-6) / extent
    else:
        raise ValueError(locations)
    return {
        "value": torch.randn(n, sum(sizes), m, d, dtype=torch.float64),
        "spatial_shapes": shapes,
        "level_start_index": starts,
        "sampling_locations": loc,
        "attention_weights": torch.rand(n, q, m, len(levels), p, dtype=torch.float64),
    }


@pytest.fixture
def conv_inputs() -> Callable[..., dict[str, Any]]:
    """Factory of random ``deform_conv2d`` arguments (see ``make_conv_inputs``)."""
    return make_conv_inputs


@pytest.fixture
def msda_inputs() -> Callable[..., dict[str, Any]]:
    """Factory of random ``multi_scale_deformable_attention`` arguments."""
    return make_msda_inputs


@contextlib.contextmanager
def num_threads(count: int) -> Iterator[None]:
    """``torch.set_num_threads(count)`` inside the block, restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True)`` inside the block when ``enabled`` (else
    the setting as it is), restored afterwards."""
    previous = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=warn_only)


@pytest.fixture
def deterministic() -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True)`` for the test, restored afterwards."""
    with deterministic_algorithms():
        yield


def count_calls(monkeypatch: pytest.MonkeyPatch, op: str) -> list[int]:
    """One entry per call of operator ``op`` through ``deformops.ops.call``, which both the
    eager path and the custom operators go through."""
    calls: list[int] = []
    run = deformops.ops.call

    def counted(name: str, *args: Any) -> torch.Tensor:
        if name == op:
            calls.append(1)
        return run(name, *args)

    monkeypatch.setattr(deformops.ops, "call", counted)
    return calls
