"""The CPU native library, called directly through ``torch.ops.deformops_native``.

Every kernel, forward and backward, against the independent float64 formulation of
``naive.py`` (on the same rounded inputs) and against ``deformops.reference`` in the same
dtype: odd shapes, points far outside the map, exactly on borders and on integer
positions, every dtype, channels-last input, chunks of the convolution that split an
image or span two, MSDA metadata that disagrees with the value, empty inputs, and equal
results on 1 and 2 threads.
"""

from __future__ import annotations

import os
from typing import Any

import naive
import pytest
import torch
from conftest import FLOAT_DTYPES, TOLERANCE, make_conv_inputs, make_msda_inputs, num_threads
from naive import relative_error

from deformops import _build, reference

pytestmark = pytest.mark.native

F64 = torch.float64
Grads = dict[str, torch.Tensor]
CONV_GRADS = ("input", "offset", "weight", "mask")
MSDA_GRADS = ("value", "sampling_locations", "attention_weights")

CONV_CASES: dict[str, dict[str, Any]] = {
    "default": {},
    "map_1x1": {"h": 1, "w": 1},
    "kernel_1x1_far_outside": {"kh": 1, "kw": 1, "padding": 0, "offsets": "far"},
    "kernel_3x5_stride_2_dilation_2": {
        "h": 7,
        "w": 12,
        "kh": 3,
        "kw": 5,
        "stride": 2,
        "dilation": 2,
        "padding": (1, 3),
    },
    "groups_3_offset_groups_4": {"c_in": 12, "c_out": 9, "groups": 3, "offset_groups": 4},
    "groups_4_offset_groups_2": {"c_in": 8, "c_out": 4, "groups": 4, "offset_groups": 2},
    "integer_and_border_positions": {"offsets": "integer", "h": 4, "w": 6},
    "no_mask_no_bias": {"mask": False, "bias": False},
}
MSDA_CASES: dict[str, dict[str, Any]] = {
    "default": {},
    "maps_1x1_head_dim_1": {"levels": ((1, 1), (1, 1)), "d": 1},
    "non_square_maps": {"levels": ((3, 7), (5, 2), (1, 4)), "m": 3, "d": 5, "p": 2},
    "exact_and_border_positions": {"levels": ((4, 8), (2, 2), (1, 1)), "locations": "exact"},
}


@pytest.fixture(scope="module", autouse=True)
def _native_library() -> None:
    """Builds (or finds in the cache) and loads the CPU library once for this module."""
    if not _build.load("cpu"):
        message = f"native CPU library unavailable: {_build.load_error('cpu')}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else value


def _round(args: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """Floating tensors of ``args`` in ``dtype`` (integer tensors and numbers unchanged)."""
    return {
        k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in args.items()
    }


def _check_errors(actual: Grads, expected: Grads, tol: float) -> None:
    """Relative error of every entry of ``actual`` against ``expected`` below ``tol``."""
    errors = {k: relative_error(v, expected[k]) for k, v in actual.items()}
    bad = {k: f"{v:.2e}" for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol:.0e}: {bad}"


# --- deform_conv2d ---------------------------------------------------------------------


def _conv_geometry(args: dict[str, Any]) -> list[int]:
    (sh, sw), (ph, pw), (dh, dw) = (_pair(args[k]) for k in ("stride", "padding", "dilation"))
    return [sh, sw, ph, pw, dh, dw]


def _conv_native(args: dict[str, Any], grad_output: torch.Tensor) -> Grads:
    """Output and gradients of the native forward and backward."""
    geometry = _conv_geometry(args)
    a = args
    ops = torch.ops.deformops_native
    out = ops.deform_conv2d_forward(
        a["input"], a["offset"], a["weight"], a["mask"], a["bias"], *geometry
    )
    grads = ops.deform_conv2d_backward(
        grad_output, a["input"], a["offset"], a["weight"], a["mask"], *geometry
    )
    result = {"output": out, **dict(zip(CONV_GRADS, grads, strict=True))}
    if a["mask"] is None:
        assert result.pop("mask").numel() == 0
    for name in CONV_GRADS:
        if name in result:
            assert result[name].shape == a[name].shape, name
            assert result[name].dtype == a[name].dtype, name
    return result


def _conv_reference(args: dict[str, Any], grad_output: torch.Tensor) -> Grads:
    a = args
    stride, padding, dilation = (_pair(a[k]) for k in ("stride", "padding", "dilation"))
    out = reference.deform_conv2d(
        a["input"], a["offset"], a["weight"], a["bias"], stride, padding, dilation, a["mask"]
    )
    grads = reference.deform_conv2d_backward(
        grad_output, a["input"], a["offset"], a["weight"], a["mask"], stride, padding, dilation
    )
    result = {"output": out, **dict(zip(CONV_GRADS, grads, strict=True))}
    return {k: v for k, v in result.items() if v is not None}


def _conv_float64(args: dict[str, Any], grad_output: torch.Tensor) -> Grads:
    """Output and gradients of ``naive.deform_conv2d`` on ``args`` in float64 (autograd)."""
    a = {k: v.detach().to(F64) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    leaves = {k: a[k].requires_grad_() for k in CONV_GRADS if a[k] is not None}
    out = naive.deform_conv2d(**a)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_output.to(F64))
    return {"output": out, **dict(zip(leaves, grads, strict=True))}


@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_conv_matches_float64_and_reference(case: str, dtype: torch.dtype) -> None:
    args = _round(make_conv_inputs(**CONV_CASES[case]), dtype)
    n, _, h_out, w_out = args["offset"].shape
    grad_output = torch.randn(n, args["weight"].shape[0], h_out, w_out).to(dtype)
    native = _conv_native(args, grad_output)
    _check_errors(native, _conv_float64(args, grad_output), TOLERANCE[dtype])
    _check_errors(native, _conv_reference(args, grad_output), TOLERANCE[dtype])


def test_conv_float32_locates_like_float64() -> None:
    """Points a rounding error from a pixel edge: the float32 offset gradient jumps there
    unless the kernel locates in float64 (sampling.h), which it does."""
    args = _round(make_conv_inputs(h=40, w=48, offsets="near_edges"), torch.float32)
    n, _, h_out, w_out = args["offset"].shape
    grad_output = torch.randn(n, args["weight"].shape[0], h_out, w_out)
    _check_errors(_conv_native(args, grad_output), _conv_float64(args, grad_output), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_conv_channels_last(dtype: torch.dtype) -> None:
    args = _round(make_conv_inputs(c_in=6, c_out=4, groups=2, offset_groups=3), dtype)
    grad_output = torch.randn(2, 4, 5, 7).to(dtype)
    contiguous = _conv_native(args, grad_output)
    last = dict(args, input=args["input"].contiguous(memory_format=torch.channels_last))
    native = _conv_native(last, grad_output.contiguous(memory_format=torch.channels_last))
    for name in ("output", "input"):
        assert native[name].is_contiguous(memory_format=torch.channels_last), name
        assert not native[name].is_contiguous(), name
    for name, value in native.items():
        torch.testing.assert_close(value, contiguous[name], msg=name)


@pytest.mark.parametrize(
    "shape",
    [
        # With chunks of 2^20 column elements (kColumnsBudget in bindings.cpp):
        # 18432 column elements a row: at most 56 rows, so 3 chunks of 43 rows; the second
        # spans two images.
        {"n": 2, "c_in": 32, "c_out": 5, "h": 64, "w": 64},
        # More column elements in one row than a chunk holds: chunks of one row.
        {"n": 1, "c_in": 120, "c_out": 3, "h": 2, "w": 1000},
    ],
    ids=["chunk_spans_images", "chunk_of_one_row"],
)
def test_conv_chunks(shape: dict[str, Any]) -> None:
    args = make_conv_inputs(**shape)
    n, _, h_out, w_out = args["offset"].shape
    grad_output = torch.randn(n, shape["c_out"], h_out, w_out, dtype=F64)
    native = _conv_native(args, grad_output)
    _check_errors(native, _conv_float64(args, grad_output), TOLERANCE[F64])


@pytest.mark.parametrize("dtype", [F64, torch.bfloat16], ids=["float64", "bfloat16"])
def test_conv_non_contiguous_arguments(dtype: torch.dtype) -> None:
    args = _round(make_conv_inputs(c_in=4, c_out=6, h=5, w=6), dtype)
    strided = {
        k: v.transpose(-1, -2).contiguous().transpose(-1, -2)
        if isinstance(v, torch.Tensor) and v.dim() == 4
        else v
        for k, v in args.items()
    }
    assert not strided["offset"].is_contiguous()
    grad_output = torch.randn(2, 6, 6, 5).to(dtype).transpose(-1, -2)
    _check_errors(
        _conv_native(strided, grad_output), _conv_float64(args, grad_output), TOLERANCE[dtype]
    )


def test_conv_threads_agree() -> None:
    args = make_conv_inputs(n=3, c_in=40, c_out=8, h=17, w=19, offset_groups=2)
    grad_output = torch.randn(3, 8, 17, 19, dtype=F64)
    with num_threads(1):
        one = _conv_native(args, grad_output)
    with num_threads(2):
        two = _conv_native(args, grad_output)
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=1e-13, atol=1e-13, msg=name)


def test_conv_empty_batch() -> None:
    args = make_conv_inputs(n=0)
    native = _conv_native(args, torch.zeros(0, 6, 5, 7, dtype=F64))
    assert native["output"].shape == (0, 6, 5, 7)
    assert native["weight"].abs().sum() == 0


def test_conv_empty_map() -> None:
    """An input of height 0 padded to an output of 2 x 5 pixels samples only zeros."""
    args = make_conv_inputs(n=1, c_in=2, c_out=3, h=0, w=3, kh=1, kw=1, padding=1)
    assert args["offset"].shape == (1, 2, 2, 5)
    native = _conv_native(args, torch.randn(1, 3, 2, 5, dtype=F64))
    expected = args["bias"].view(1, 3, 1, 1).expand(1, 3, 2, 5)
    torch.testing.assert_close(native.pop("output"), expected, rtol=0, atol=0)
    for name, value in native.items():
        assert not value.any(), name


def test_conv_rejects_mixed_dtypes() -> None:
    args = make_conv_inputs()
    args["offset"] = args["offset"].float()
    with pytest.raises(RuntimeError, match="offset, weight and mask"):
        _conv_native(args, torch.zeros(2, 6, 5, 7, dtype=F64))


# --- multi_scale_deformable_attention ---------------------------------------------------


def _msda_args(args: dict[str, Any]) -> list[torch.Tensor]:
    names = ("value", "spatial_shapes", "level_start_index")
    return [args[k] for k in (*names, "sampling_locations", "attention_weights")]


def _msda_native(args: dict[str, Any], grad_output: torch.Tensor) -> Grads:
    ops = torch.ops.deformops_native
    out = ops.msda_forward(*_msda_args(args))
    grads = ops.msda_backward(grad_output, *_msda_args(args))
    result = {"output": out, **dict(zip(MSDA_GRADS, grads, strict=True))}
    assert out.dtype == args["value"].dtype
    for name in MSDA_GRADS:
        assert result[name].shape == args[name].shape, name
        assert result[name].dtype == args[name].dtype, name
    return result


def _msda_reference(args: dict[str, Any], grad_output: torch.Tensor) -> Grads:
    out = reference.multi_scale_deformable_attention(*_msda_args(args))
    grads = reference.multi_scale_deformable_attention_backward(grad_output, *_msda_args(args))
    return {"output": out, **dict(zip(MSDA_GRADS, grads, strict=True))}


def _msda_float64(args: dict[str, Any], grad_output: torch.Tensor) -> Grads:
    a = {k: v.detach().to(F64) if v.is_floating_point() else v for k, v in args.items()}
    leaves = [a[k].requires_grad_() for k in MSDA_GRADS]
    out = naive.multi_scale_deformable_attention(**a)
    grads = torch.autograd.grad(out, leaves, grad_output.to(F64))
    return {"output": out, **dict(zip(MSDA_GRADS, grads, strict=True))}


def _msda_grad_output(args: dict[str, Any]) -> torch.Tensor:
    n, _, m, d = args["value"].shape
    q = args["sampling_locations"].shape[1]
    return torch.randn(n, q, m * d).to(args["value"].dtype)


@pytest.mark.parametrize("case", list(MSDA_CASES))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_msda_matches_float64_and_reference(case: str, dtype: torch.dtype) -> None:
    args = _round(make_msda_inputs(**MSDA_CASES[case]), dtype)
    grad_output = _msda_grad_output(args)
    native = _msda_native(args, grad_output)
    _check_errors(native, _msda_float64(args, grad_output), TOLERANCE[dtype])
    _check_errors(native, _msda_reference(args, grad_output), TOLERANCE[dtype])


def test_msda_float32_locates_like_float64() -> None:
    """Points a rounding error from a pixel edge: the float32 location gradient jumps there
    unless the backward locates in float64, which it does."""
    levels = ((40, 48), (20, 24), (10, 12))
    args = _round(make_msda_inputs(levels=levels, q=200, locations="near_edges"), torch.float32)
    grad_output = _msda_grad_output(args)
    _check_errors(_msda_native(args, grad_output), _msda_float64(args, grad_output), 1e-5)


@pytest.mark.parametrize(
    ("locations", "weights"),
    [(torch.float32, torch.float32), (torch.float32, None), (None, torch.float32)],
    ids=["both_float32", "locations_float32", "weights_float32"],
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_msda_float32_locations_or_weights(
    dtype: torch.dtype, locations: torch.dtype | None, weights: torch.dtype | None
) -> None:
    args = _round(make_msda_inputs(), dtype)
    args["sampling_locations"] = make_msda_inputs()["sampling_locations"].to(locations or dtype)
    args["attention_weights"] = args["attention_weights"].to(weights or dtype)
    grad_output = _msda_grad_output(args)
    native = _msda_native(args, grad_output)
    _check_errors(native, _msda_float64(args, grad_output), TOLERANCE[dtype])


def test_msda_metadata_disagreeing_with_value() -> None:
    """Levels that claim more pixels than the value holds, or start outside it: corners
    outside the value are skipped (memory safety), as in the reference."""
    args = make_msda_inputs(n=2, levels=((4, 6), (3, 2), (1, 1)), q=7)
    s = args["value"].shape[1]  # 31
    args["spatial_shapes"] = torch.tensor([[9, 9], [3, 2], [2, 3]])
    args["level_start_index"] = torch.tensor([-5, s - 3, s + 2])
    grad_output = _msda_grad_output(args)
    _check_errors(
        _msda_native(args, grad_output), _msda_reference(args, grad_output), TOLERANCE[F64]
    )


@pytest.mark.parametrize("dtype", [F64, torch.float16], ids=["float64", "float16"])
def test_msda_non_contiguous_arguments(dtype: torch.dtype) -> None:
    args = _round(make_msda_inputs(), dtype)
    strided = {
        k: v.transpose(0, 1).contiguous().transpose(0, 1) if v.dim() > 1 else v
        for k, v in args.items()
    }
    assert not strided["sampling_locations"].is_contiguous()
    grad_output = _msda_grad_output(args).transpose(0, 1).contiguous().transpose(0, 1)
    _check_errors(
        _msda_native(strided, grad_output), _msda_float64(args, grad_output), TOLERANCE[dtype]
    )


def test_msda_threads_agree_exactly() -> None:
    """Each (n, m) slice of the value gradient has one writer: no lost update, and the
    same result to the last bit whatever the number of threads."""
    args = _round(make_msda_inputs(n=2, q=300, m=3, d=8, p=4), torch.float32)
    grad_output = _msda_grad_output(args)
    with num_threads(1):
        one = _msda_native(args, grad_output)
    with num_threads(2):
        two = _msda_native(args, grad_output)
    for name, value in one.items():
        assert torch.equal(two[name], value), name


@pytest.mark.parametrize(
    "shape", [{"n": 0}, {"q": 0}, {"levels": ((0, 3),)}], ids=["batch_0", "queries_0", "pixels_0"]
)
def test_msda_empty(shape: dict[str, Any]) -> None:
    args = make_msda_inputs(**shape)
    grad_output = torch.randn(*args["sampling_locations"].shape[:2], 8, dtype=F64)
    native = _msda_native(args, grad_output)
    assert native["output"].shape == grad_output.shape
    for value in native.values():
        assert not value.any()


def test_msda_rejects_locations_of_another_dtype() -> None:
    args = _round(make_msda_inputs(), torch.float32)
    args["sampling_locations"] = args["sampling_locations"].double()
    with pytest.raises(RuntimeError, match="sampling_locations must be"):
        torch.ops.deformops_native.msda_forward(*_msda_args(args))
