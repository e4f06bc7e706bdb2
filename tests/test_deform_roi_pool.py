"""Deformable RoI pooling against the independent float64 formulation in ``naive.py``.

Forward and the gradients of the input and the offsets, with both backends, on odd shapes,
RoIs inside, across and outside the map, samples exactly on pixel centres and borders,
both sampling modes, every floating dtype; the native CPU kernels called directly
(against the reference, thread-count invariance, RoIs with a bad batch index); gradcheck,
opcheck, torch.compile, autocast, empty inputs and argument errors.
"""

from __future__ import annotations

import os
from typing import Any

import naive
import pytest
import torch
from conftest import FLOAT_DTYPES, TOLERANCE, num_threads
from naive import relative_error
from test_errors import raises
from test_ops import (
    _assert_empty_ok,
    _compare_with_naive,
    _compiled_equals_eager,
    _evaluate,
    _opcheck_with_backward,
    _requires_grad,
    _second_derivative,
)

import deformops
from deformops import _build, ops, reference
from deformops.nn import DeformRoIPool2d, DeformRoIPoolPack2d, ModulatedDeformRoIPoolPack2d

FLOATS = ("input", "offset")
F64 = torch.float64


def make_roi_inputs(
    n: int = 2,
    c: int = 3,
    h: int = 9,
    w: int = 11,
    k: int = 7,
    output_size: int | tuple[int, int] = (3, 4),
    spatial_scale: float = 0.5,
    sampling_ratio: int = 0,
    gamma: float = 0.3,
    rois: str = "random",
    offsets: str | None = "random",
) -> dict[str, Any]:
    """Random float64 arguments of ``deform_roi_pool`` (keyword names of the public API).

    ``rois``: ``"random"`` (boxes of the image, ``1 / spatial_scale`` times the map, that
    start up to 30% outside it and measure up to 80% of it, a few with x2 < x1 or y2 <
    y1), ``"far"`` (also boxes wholly beyond one pixel outside the map) or ``"integer"``
    (integer corners and a whole number of pixels per bin, with ``spatial_scale`` 1 and
    adaptive sampling: samples exactly on pixel centres, on the borders 0 and H-1 and one
    pixel outside, -1 and H). ``offsets``: ``"random"`` (``randn``), ``"zero"`` or None.
    """
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
    batch = torch.randint(0, n, (k, 1)).to(F64)
    if rois == "integer":
        spatial_scale, sampling_ratio = 1.0, 0
        bins = torch.randint(1, 3, (k, 2)).to(F64) * torch.tensor([ow, oh], dtype=F64)
        corner = torch.stack([torch.randint(-3, w, (k,)), torch.randint(-3, h, (k,))], 1).to(F64)
        boxes = torch.cat([corner, corner + bins], 1)
    else:
        extent = torch.tensor([w, h], dtype=F64) / spatial_scale
        corner = (torch.rand(k, 2, dtype=F64) * 1.4 - 0.3) * extent
        size = torch.rand(k, 2, dtype=F64) * 0.8 * extent
        size[: k // 3, 0] *= -0.25  # x2 < x1: an empty RoI
        boxes = torch.cat([corner, corner + size], 1)
        if rois == "far":
            boxes[::2] += torch.tensor([2.0, 0, 2.0, 0], dtype=F64) * extent[0] + 3 / spatial_scale
    offset = {
        "random": lambda: torch.randn(k, 2, oh, ow, dtype=F64),
        "zero": lambda: torch.zeros(k, 2, oh, ow, dtype=F64),
        None: lambda: None,
    }[offsets]()
    return {
        "input": torch.randn(n, c, h, w, dtype=F64),
        "rois": torch.cat([batch, boxes], 1),
        "offset": offset,
        "output_size": output_size,
        "spatial_scale": spatial_scale,
        "sampling_ratio": sampling_ratio,
        "gamma": gamma,
    }


CASES: dict[str, dict[str, Any]] = {
    "default": {},
    "no_offset": {"offsets": None},
    "sampling_ratio_2": {"sampling_ratio": 2},
    "sampling_ratio_1_output_1x1": {"sampling_ratio": 1, "output_size": 1},
    "output_7x7_one_channel": {"output_size": 7, "c": 1, "k": 3},
    "odd_map_5x3_scale_1": {"h": 5, "w": 3, "spatial_scale": 1.0},
    "map_1x1": {"h": 1, "w": 1, "spatial_scale": 0.25},
    "gamma_0": {"gamma": 0.0},
    "gamma_1": {"gamma": 1.0, "sampling_ratio": 3},
    "far_outside": {"rois": "far"},
    "integer_and_border_positions": {"rois": "integer", "offsets": "zero"},
    "integer_boxes_with_offsets": {"rois": "integer"},
    "one_roi_batch_1": {"n": 1, "k": 1},
}
DTYPE_CASES = ("default", "no_offset", "sampling_ratio_2", "integer_and_border_positions")


def _cast(args: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """Every tensor of ``args`` in ``dtype``."""
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def _dtypes(dtype: torch.dtype, coordinates: torch.dtype | None = None) -> dict[str, torch.dtype]:
    return {"input": dtype, "offset": coordinates or dtype, "rois": coordinates or dtype}


@pytest.mark.parametrize("case", list(CASES))
def test_float64_matches_naive(backend: str, case: str) -> None:
    args = make_roi_inputs(**CASES[case])
    _compare_with_naive(
        deformops.deform_roi_pool,
        naive.deform_roi_pool,
        args,
        FLOATS,
        _dtypes(F64),
        TOLERANCE[F64],
    )


@pytest.mark.parametrize("case", DTYPE_CASES)
def test_dtype_matches_naive(backend: str, dtype: torch.dtype, case: str) -> None:
    args = make_roi_inputs(**CASES[case])
    _compare_with_naive(
        deformops.deform_roi_pool,
        naive.deform_roi_pool,
        args,
        FLOATS,
        _dtypes(dtype),
        TOLERANCE[dtype],
    )


def test_float32_rois_and_offset_with_half_input(backend: str, half_dtype: torch.dtype) -> None:
    args = make_roi_inputs(c=4, h=12, w=10)
    _compare_with_naive(
        deformops.deform_roi_pool,
        naive.deform_roi_pool,
        args,
        FLOATS,
        _dtypes(half_dtype, torch.float32),
        TOLERANCE[half_dtype],
    )


def test_zero_offset_is_no_offset(backend: str) -> None:
    args = make_roi_inputs(offsets="zero")
    torch.testing.assert_close(
        deformops.deform_roi_pool(**args),
        deformops.deform_roi_pool(**{**args, "offset": None}),
        rtol=0,
        atol=0,
    )


def test_positional_order_and_defaults(backend: str) -> None:
    args = make_roi_inputs(output_size=7, spatial_scale=1.0, sampling_ratio=0, gamma=0.1)
    a = args
    positional = deformops.deform_roi_pool(a["input"], a["rois"], a["offset"], 7, 1.0, 0, 0.1)
    defaults = deformops.deform_roi_pool(a["input"], a["rois"], a["offset"])
    torch.testing.assert_close(positional, deformops.deform_roi_pool(**args), rtol=0, atol=0)
    torch.testing.assert_close(defaults, positional, rtol=0, atol=0)


def test_channels_last_input(backend: str) -> None:
    args = make_roi_inputs(c=5)
    last = {**args, "input": args["input"].contiguous(memory_format=torch.channels_last)}
    assert not last["input"].is_contiguous()
    _compare_with_naive(
        deformops.deform_roi_pool, naive.deform_roi_pool, last, FLOATS, _dtypes(F64), 1e-10
    )
    out, grads, _ = _evaluate(deformops.deform_roi_pool, last, FLOATS)
    assert out.is_contiguous()
    assert grads["input"].is_contiguous(memory_format=torch.channels_last)


def test_sample_between_pixels_and_clamped_border(backend: str) -> None:
    """One bin of one sample at ``((y1 + y2) / 2 - 0.5, (x1 + x2) / 2 - 0.5)`` of the map
    ``4*y + x`` (3 x 4), which bilinear interpolation reproduces exactly: a pixel centre,
    a point between pixels, points in the band within one pixel of the map (clamped to
    the nearest border pixel) and a point beyond it (zero)."""
    x = torch.arange(12, dtype=F64).view(1, 1, 3, 4)
    samples = {  # (x1, y1, x2, y2): value
        (1.5, 1.5, 1.5, 1.5): 5.0,  # (y, x) = (1, 1)
        (1.5, 1.0, 2.5, 1.0): 3.5,  # (0.5, 1.5)
        (-0.25, 1.5, -0.25, 1.5): 4.0,  # (1, -0.75) reads (1, 0)
        (3.75, 0.5, 3.75, 0.5): 3.0,  # (0, 3.25) reads (0, 3)
        (1.5, -0.25, 1.5, -0.25): 1.0,  # (-0.75, 1) reads (0, 1)
        (1.5, 3.25, 1.5, 3.25): 9.0,  # (2.75, 1) reads (2, 1)
        (4.75, 0.5, 4.75, 0.5): 0.0,  # (0, 4.25): beyond one pixel outside
    }
    rois = torch.tensor([[0.0, *box] for box in samples], dtype=F64)
    out = deformops.deform_roi_pool(x, rois, output_size=1, sampling_ratio=1)
    expected = torch.tensor(list(samples.values()), dtype=F64)
    torch.testing.assert_close(out.flatten(), expected, rtol=0, atol=1e-14)


def test_offset_moves_bins_by_gamma_times_roi_size(backend: str) -> None:
    """An offset of (dx, dy) = (0.5, 0.25) with gamma 1 moves a 4x8 RoI's bin by (4, 1)
    pixels: the same as moving the RoI."""
    args = make_roi_inputs(n=1, c=2, h=16, w=16, k=1, output_size=1, spatial_scale=1.0)
    args["rois"] = torch.tensor([[0.0, 2.0, 3.0, 10.0, 7.0]], dtype=F64)
    args["offset"] = torch.tensor([0.5, 0.25], dtype=F64).view(1, 2, 1, 1)
    args["gamma"] = 1.0
    moved = {**args, "rois": args["rois"] + torch.tensor([0, 4.0, 1.0, 4.0, 1.0]), "offset": None}
    torch.testing.assert_close(
        deformops.deform_roi_pool(**args), deformops.deform_roi_pool(**moved), rtol=0, atol=1e-14
    )


# --- autograd, custom-op and compiler checks --------------------------------------------


def _small(**overrides: Any) -> dict[str, Any]:
    return make_roi_inputs(**{"n": 2, "c": 2, "h": 5, "w": 6, "k": 4, **overrides})


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_gradcheck(backend: str, sampling_ratio: int) -> None:
    args = _requires_grad(_small(sampling_ratio=sampling_ratio), FLOATS)

    def fn(input: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return deformops.deform_roi_pool(**{**args, "input": input, "offset": offset})

    assert torch.autograd.gradcheck(fn, [args["input"], args["offset"]])


@pytest.mark.parametrize("offsets", ["random", None], ids=["offset", "no_offset"])
def test_opcheck(backend: str, offsets: str | None) -> None:
    a = _requires_grad(_small(offsets=offsets), FLOATS)
    args = (a["input"], a["rois"], a["offset"], 3, 4, a["spatial_scale"], 0, a["gamma"])
    _opcheck_with_backward(
        torch.ops.deformops.deform_roi_pool.default, args, "deformops::deform_roi_pool_backward"
    )


def _roi_fn(**kwargs: Any) -> torch.Tensor:
    return deformops.deform_roi_pool(**kwargs).relu() * 2


def test_compile_fullgraph(backend: str) -> None:
    torch._dynamo.reset()
    args = _cast(make_roi_inputs(), torch.float32)
    _compiled_equals_eager(_roi_fn, args, FLOATS, "aot_eager")


def test_autocast_runs_in_half_with_float32_rois(backend: str) -> None:
    args = _cast(_small(), torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = deformops.deform_roi_pool(**args)
    assert out.dtype == torch.bfloat16
    rounded = {**args, "input": args["input"].bfloat16()}
    expected = naive.deform_roi_pool(**_cast(rounded, F64))
    assert relative_error(out, expected) <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("offsets", ["random", None], ids=["offset", "no_offset"])
def test_no_rois(backend: str, offsets: str | None) -> None:
    args = make_roi_inputs(k=0, offsets=offsets)
    _assert_empty_ok(deformops.deform_roi_pool, args, FLOATS, (0, 3, 3, 4))


def test_empty_map(backend: str) -> None:
    args = make_roi_inputs(h=0, w=4)
    _assert_empty_ok(deformops.deform_roi_pool, args, FLOATS, (7, 3, 3, 4))


def test_double_backward_raises(backend: str) -> None:
    with pytest.raises(RuntimeError, match=r"(?i)double backward|create_graph"):
        _second_derivative(deformops.deform_roi_pool, _small(), FLOATS)


# --- modules ----------------------------------------------------------------------------

PACKS = [DeformRoIPoolPack2d, ModulatedDeformRoIPoolPack2d]
# mmcv's parameter names and shapes for output_size (3, 4), 3 channels, 8 hidden units.
MMCV_SHAPES = {
    "offset_fc.0.weight": (8, 36),
    "offset_fc.0.bias": (8,),
    "offset_fc.2.weight": (8, 8),
    "offset_fc.2.bias": (8,),
    "offset_fc.4.weight": (24, 8),
    "offset_fc.4.bias": (24,),
}
MMCV_MASK_SHAPES = {
    "mask_fc.0.weight": (8, 36),
    "mask_fc.0.bias": (8,),
    "mask_fc.2.weight": (12, 8),
    "mask_fc.2.bias": (12,),
}


def _pack(cls: type, **kwargs: Any) -> DeformRoIPoolPack2d:
    return cls((3, 4), 3, deform_fc_channels=8, spatial_scale=0.5, gamma=0.3, **kwargs)


def test_pool_module_is_the_function(backend: str) -> None:
    args = make_roi_inputs()
    pool = DeformRoIPool2d((3, 4), spatial_scale=0.5, sampling_ratio=2, gamma=0.3)
    expected = deformops.deform_roi_pool(**{**args, "sampling_ratio": 2})
    torch.testing.assert_close(pool(args["input"], args["rois"], args["offset"]), expected)
    assert "sampling_ratio=2" in repr(pool)


@pytest.mark.parametrize("cls", PACKS, ids=lambda c: c.__name__)
def test_fresh_pack_is_roi_align(backend: str, cls: type) -> None:
    args = _cast(make_roi_inputs(offsets=None), torch.float32)
    out = _pack(cls)(args["input"], args["rois"])
    scale = 0.5 if cls is ModulatedDeformRoIPoolPack2d else 1.0
    torch.testing.assert_close(out, scale * deformops.deform_roi_pool(**args))


@pytest.mark.parametrize("cls", PACKS, ids=lambda c: c.__name__)
def test_pack_parameters_are_mmcv_s(cls: type) -> None:
    expected = MMCV_SHAPES | (MMCV_MASK_SHAPES if cls is ModulatedDeformRoIPoolPack2d else {})
    state = _pack(cls).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    last = ["offset_fc.4"] + (["mask_fc.2"] if cls is ModulatedDeformRoIPoolPack2d else [])
    for name in last:
        assert not state[f"{name}.weight"].any(), name
        assert not state[f"{name}.bias"].any(), name


def _linear(state: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    return x @ state[f"{name}.weight"].T + state[f"{name}.bias"]


@pytest.mark.parametrize("cls", PACKS, ids=lambda c: c.__name__)
def test_pack_with_an_mmcv_state_dict_matches_naive(backend: str, cls: type) -> None:
    """A state dict in mmcv's layout loads, and the layer computes mmcv's forward: offsets
    (and mask) from the flattened pooling without offsets."""
    shapes = MMCV_SHAPES | (MMCV_MASK_SHAPES if cls is ModulatedDeformRoIPoolPack2d else {})
    state = {k: 0.2 * torch.randn(shape, dtype=F64) for k, shape in shapes.items()}
    layer = _pack(cls).double()
    layer.load_state_dict(state)
    args = make_roi_inputs(offsets=None)
    out = layer(args["input"], args["rois"])

    flat = naive.deform_roi_pool(**args).flatten(1)
    hidden = _linear(state, "offset_fc.2", _linear(state, "offset_fc.0", flat).relu()).relu()
    offset = _linear(state, "offset_fc.4", hidden).view(-1, 2, 3, 4)
    expected = naive.deform_roi_pool(**{**args, "offset": offset})
    if cls is ModulatedDeformRoIPoolPack2d:
        mask = _linear(state, "mask_fc.2", _linear(state, "mask_fc.0", flat).relu()).sigmoid()
        expected = expected * mask.view(-1, 1, 3, 4)
    assert relative_error(out, expected) <= 1e-10


@pytest.mark.parametrize("cls", PACKS, ids=lambda c: c.__name__)
def test_pack_backward_reaches_every_parameter(backend: str, cls: type) -> None:
    layer = _pack(cls)
    for parameter in layer.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    args = _cast(make_roi_inputs(offsets=None), torch.float32)
    features = args["input"].requires_grad_()
    layer(features, args["rois"]).square().sum().backward()
    for name, parameter in [("input", features), *layer.named_parameters()]:
        assert parameter.grad is not None, name
        assert parameter.grad.any(), name


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: DeformRoIPoolPack2d(7, 0), "output_channels"),
        (lambda: DeformRoIPoolPack2d(7, 3, deform_fc_channels=-1), "deform_fc_channels"),
        (lambda: ModulatedDeformRoIPoolPack2d((7, 0), 3), "output_size"),
        (lambda: DeformRoIPool2d(7, spatial_scale=0.0), "spatial_scale"),
        (lambda: DeformRoIPool2d(7, gamma=float("nan")), "gamma"),
    ],
    ids=["output_channels", "deform_fc_channels", "output_size", "spatial_scale", "gamma"],
)
def test_module_construction_errors(make: Any, name: str) -> None:
    with raises(ValueError, name):
        make()


@pytest.mark.parametrize("cls", PACKS, ids=lambda c: c.__name__)
def test_pack_rejects_input_of_other_channels(cls: type) -> None:
    args = _cast(make_roi_inputs(c=4), torch.float32)
    with raises(ValueError, "input", "4"):
        _pack(cls)(args["input"], args["rois"])


# --- the native CPU kernels -------------------------------------------------------------


@pytest.fixture
def native_cpu() -> None:
    if not _build.load("cpu"):
        message = f"native CPU library unavailable: {_build.load_error('cpu')}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def _params(args: dict[str, Any]) -> tuple[int, int, float, int, float]:
    size = args["output_size"]
    oh, ow = (size, size) if isinstance(size, int) else size
    return oh, ow, args["spatial_scale"], args["sampling_ratio"], args["gamma"]


def _native(args: dict[str, Any], grad_output: torch.Tensor) -> dict[str, torch.Tensor]:
    native = torch.ops.deformops_native
    params = _params(args)
    out = native.deform_roi_pool_forward(args["input"], args["rois"], args["offset"], *params)
    grad_input, grad_offset = native.deform_roi_pool_backward(
        grad_output, args["input"], args["rois"], args["offset"], *params
    )
    result = {"output": out, "input": grad_input}
    if args["offset"] is not None:
        result["offset"] = grad_offset
    else:
        assert grad_offset.numel() == 0
    return result


def _reference(args: dict[str, Any], grad_output: torch.Tensor) -> dict[str, torch.Tensor]:
    oh, ow, *params = _params(args)
    tensors = (args["input"], args["rois"], args["offset"], (oh, ow), *params)
    out = reference.deform_roi_pool(*tensors)
    grad_input, grad_offset = reference.deform_roi_pool_backward(grad_output, *tensors)
    result = {"output": out, "input": grad_input}
    if grad_offset is not None:
        result["offset"] = grad_offset
    return result


@pytest.mark.usefixtures("native_cpu")
@pytest.mark.parametrize(
    "case", ["default", "no_offset", "far_outside", "integer_boxes_with_offsets"]
)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_native_matches_reference(case: str, dtype: torch.dtype) -> None:
    args = _cast(make_roi_inputs(**CASES[case]), dtype)
    oh, ow = _params(args)[:2]
    grad_output = torch.randn(args["rois"].shape[0], args["input"].shape[1], oh, ow).to(dtype)
    native = _native(args, grad_output)
    expected = _reference(args, grad_output)
    for name, value in native.items():
        assert value.dtype == dtype, name
        assert relative_error(value, expected[name]) <= TOLERANCE[dtype], name


@pytest.mark.usefixtures("native_cpu")
def test_native_threads_agree_exactly() -> None:
    args = _cast(make_roi_inputs(n=3, c=40, h=17, w=19, k=30), torch.float32)
    grad_output = torch.randn(30, 40, 3, 4)
    with num_threads(1):
        one = _native(args, grad_output)
    with num_threads(2):
        two = _native(args, grad_output)
    for name, value in one.items():
        assert torch.equal(two[name], value), name


@pytest.mark.usefixtures("native_cpu")
def test_native_skips_rois_with_a_bad_batch_index() -> None:
    """Batch indices outside [0, N), NaN and infinite coordinates reach the kernels when
    the value checks are skipped (compiling, graph capture): such RoIs pool zeros and
    take no gradient, the others are unaffected."""
    args = make_roi_inputs(n=2, k=6)
    bad = args["rois"].clone()
    bad[0, 0] = 2.0
    bad[1, 0] = -1.0
    bad[2, 0] = 1e30
    bad[3, 0] = float("nan")
    bad[4, 1] = float("inf")
    grad_output = torch.randn(6, 3, 3, 4, dtype=F64)
    native = _native({**args, "rois": bad}, grad_output)
    kept = _native(
        {**args, "rois": args["rois"][5:], "offset": args["offset"][5:]}, grad_output[5:]
    )
    assert not native["output"][:5].any()
    assert not native["offset"][:5].any()
    torch.testing.assert_close(native["output"][5:], kept["output"], rtol=0, atol=0)
    torch.testing.assert_close(native["input"], kept["input"], rtol=0, atol=1e-15)
    torch.testing.assert_close(native["offset"][5:], kept["offset"], rtol=0, atol=0)
    custom_op = ops.deform_roi_pool(args["input"], bad, args["offset"], *_params(args))
    torch.testing.assert_close(custom_op, native["output"])
    expected = _reference({**args, "rois": bad}, grad_output)
    for name, value in expected.items():
        assert value.isfinite().all(), name
        torch.testing.assert_close(native[name], value, msg=name)


@pytest.mark.usefixtures("native_cpu")
def test_native_rejects_rois_of_another_dtype() -> None:
    args = _cast(make_roi_inputs(), torch.float32)
    args["rois"] = args["rois"].double()
    with pytest.raises(RuntimeError, match="rois must be"):
        _native(args, torch.zeros(7, 3, 3, 4))


# --- argument errors --------------------------------------------------------------------


def _args() -> dict[str, Any]:
    return _cast(make_roi_inputs(), torch.float32)


# Base shapes: input [2, 3, 9, 11], rois [7, 5], offset [7, 2, 3, 4], output_size (3, 4).
SHAPE_ERRORS = {
    "input_rank_3": ("input", lambda a: {**a, "input": torch.zeros(3, 9, 11)}),
    "rois_rank_1": ("rois", lambda a: {**a, "rois": torch.zeros(35)}),
    "rois_4_columns": ("rois", lambda a: {**a, "rois": torch.zeros(7, 4)}),
    "offset_rank_3": ("offset", lambda a: {**a, "offset": torch.zeros(7, 2, 12)}),
    "offset_rois": ("offset", lambda a: {**a, "offset": torch.zeros(6, 2, 3, 4)}),
    "offset_channels": ("offset", lambda a: {**a, "offset": torch.zeros(7, 3, 3, 4)}),
    "offset_output_size": ("offset", lambda a: {**a, "offset": torch.zeros(7, 2, 4, 3)}),
}


@pytest.mark.parametrize("case", list(SHAPE_ERRORS))
def test_shape_errors(case: str) -> None:
    name, perturb = SHAPE_ERRORS[case]
    args = perturb(_args())
    with raises(ValueError, name, ", ".join(str(s) for s in args[name].shape)):
        deformops.deform_roi_pool(**args)


TYPE_ERRORS = {
    "input_int64": ("input", lambda a: {**a, "input": a["input"].long()}),
    "input_list": ("input", lambda a: {**a, "input": a["input"].tolist()}),
    "rois_float64": ("rois", lambda a: {**a, "rois": a["rois"].double()}),
    "rois_int64": ("rois", lambda a: {**a, "rois": a["rois"].long()}),
    "offset_float64": ("offset", lambda a: {**a, "offset": a["offset"].double()}),
    "offset_numpy": ("offset", lambda a: {**a, "offset": a["offset"].numpy()}),
    "half_input_half_rois_of_other_kind": (
        "rois",
        lambda a: {**a, "input": a["input"].half(), "rois": a["rois"].bfloat16(), "offset": None},
    ),
    "output_size_float": ("output_size", lambda a: {**a, "output_size": 7.0}),
    "output_size_triple": ("output_size", lambda a: {**a, "output_size": (3, 4, 5)}),
    "spatial_scale_string": ("spatial_scale", lambda a: {**a, "spatial_scale": "1/16"}),
    "sampling_ratio_float": ("sampling_ratio", lambda a: {**a, "sampling_ratio": 2.0}),
    "sampling_ratio_bool": ("sampling_ratio", lambda a: {**a, "sampling_ratio": True}),
    "gamma_tensor": ("gamma", lambda a: {**a, "gamma": torch.tensor(0.1)}),
}


@pytest.mark.parametrize("case", list(TYPE_ERRORS))
def test_type_errors(case: str) -> None:
    name, perturb = TYPE_ERRORS[case]
    with raises(TypeError, name):
        deformops.deform_roi_pool(**perturb(_args()))


VALUE_ERRORS = {
    "output_size_0": ("output_size", {"output_size": (0, 4)}),
    "spatial_scale_0": ("spatial_scale", {"spatial_scale": 0.0}),
    "spatial_scale_negative": ("spatial_scale", {"spatial_scale": -0.5}),
    "spatial_scale_nan": ("spatial_scale", {"spatial_scale": float("nan")}),
    "gamma_inf": ("gamma", {"gamma": float("inf")}),
}


@pytest.mark.parametrize("case", list(VALUE_ERRORS))
def test_value_errors(case: str) -> None:
    name, change = VALUE_ERRORS[case]
    with raises(ValueError, name):
        deformops.deform_roi_pool(**{**_args(), **change})


@pytest.mark.parametrize("index", [2.0, -1.0, float("nan")], ids=["N", "negative", "nan"])
def test_batch_index_out_of_range(index: float) -> None:
    args = _args()
    args["rois"][3, 0] = index
    with raises(ValueError, "rois", "[0, 2)"):
        deformops.deform_roi_pool(**args)


@pytest.mark.parametrize("name", ["rois", "offset"])
def test_mixed_devices(name: str) -> None:
    args = _args()
    args[name] = args[name].to("meta")
    with raises(ValueError, name):
        deformops.deform_roi_pool(**args)
