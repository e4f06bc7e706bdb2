"""The functional operators against the independent float64 formulation in ``naive.py``.

Forward and every gradient, on odd shapes, in every floating dtype, both memory formats,
plus gradcheck, opcheck, torch.compile, empty inputs and the double-backward error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import naive
import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCE, make_conv_inputs, make_msda_inputs
from naive import relative_error
from torch.utils._python_dispatch import TorchDispatchMode

import deformops

CONV_FLOATS = ("input", "offset", "weight", "bias", "mask")
MSDA_FLOATS = ("value", "sampling_locations", "attention_weights")

CONV_CASES: dict[str, dict[str, Any]] = {
    "default": {},
    "map_1x1": {"h": 1, "w": 1},
    "map_1x1_kernel_1x1": {"h": 1, "w": 1, "kh": 1, "kw": 1, "padding": 0},
    "kernel_1x1": {"kh": 1, "kw": 1, "padding": 0},
    "kernel_3x5_non_square_map": {"h": 4, "w": 9, "kh": 3, "kw": 5, "padding": (1, 2)},
    "stride_2": {"h": 8, "w": 7, "stride": 2},
    "pair_arguments": {"h": 8, "w": 7, "stride": (2, 1), "padding": (0, 2), "dilation": (1, 2)},
    "dilation_2_padding_2": {"dilation": 2, "padding": 2},
    "padding_0": {"padding": 0},
    "padding_2": {"padding": 2},
    "groups_3": {"c_in": 6, "c_out": 9, "groups": 3},
    "offset_groups_4": {"c_in": 8, "offset_groups": 4},
    "groups_2_offset_groups_3": {"c_in": 6, "c_out": 4, "groups": 2, "offset_groups": 3},
    "no_mask": {"mask": False},
    "no_bias": {"bias": False},
    "no_mask_no_bias": {"mask": False, "bias": False},
    "far_outside": {"offsets": "far"},
    "integer_and_border_positions": {"offsets": "integer"},
    "batch_1": {"n": 1, "c_in": 3, "c_out": 1},
}
CONV_DTYPE_CASES = (
    "default",
    "pair_arguments",
    "groups_2_offset_groups_3",
    "integer_and_border_positions",
)

MSDA_CASES: dict[str, dict[str, Any]] = {
    "default": {},
    "head_dim_1": {"d": 1},
    "head_dim_12": {"d": 12},
    "head_dim_32": {"d": 32, "m": 1},
    "head_dim_48": {"d": 48, "m": 1, "p": 2},
    "one_level_one_point": {"levels": ((3, 5),), "p": 1},
    "four_levels_four_points": {"levels": ((6, 8), (3, 4), (2, 2), (1, 1)), "m": 3, "p": 4},
    "one_query": {"q": 1},
    "maps_1x1": {"levels": ((1, 1), (1, 1))},
    "exact_and_border_positions": {"levels": ((4, 8), (2, 2), (1, 1)), "locations": "exact"},
    "batch_1_head_1": {"n": 1, "m": 1},
}
MSDA_DTYPE_CASES = (
    "default",
    "head_dim_12",
    "four_levels_four_points",
    "exact_and_border_positions",
)


def _evaluate(
    fn: Callable[..., torch.Tensor],
    args: dict[str, Any],
    names: tuple[str, ...],
    grad_output: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Output, gradients of every tensor in ``names`` that is present, and the grad_output."""
    args = dict(args)
    leaves = {}
    for name in names:
        if args.get(name) is not None:
            leaves[name] = args[name] = args[name].detach().clone().requires_grad_()
    out = fn(**args)
    if grad_output is None:
        grad_output = torch.randn(out.shape, dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_output.to(out.dtype))
    return out, dict(zip(leaves, grads, strict=True)), grad_output


def _cast(args: dict[str, Any], dtypes: dict[str, torch.dtype]) -> dict[str, Any]:
    return {
        k: v.to(dtypes[k]) if k in dtypes and isinstance(v, torch.Tensor) else v
        for k, v in args.items()
    }


def _compare_with_naive(
    op: Callable[..., torch.Tensor],
    truth: Callable[..., torch.Tensor],
    args: dict[str, Any],
    names: tuple[str, ...],
    dtypes: dict[str, torch.dtype],
    tol: float,
) -> None:
    """Runs ``op`` on ``args`` cast to ``dtypes`` and ``truth`` on the same values in float64."""
    op_args = _cast(args, dtypes)
    truth_args = _cast(op_args, dict.fromkeys(dtypes, torch.float64))
    out, grads, grad_output = _evaluate(op, op_args, names)
    expected, expected_grads, _ = _evaluate(truth, truth_args, names, grad_output.double())
    assert out.dtype == op_args[names[0]].dtype
    errors = {"output": relative_error(out, expected)}
    for name, grad in grads.items():
        assert grad.dtype == op_args[name].dtype, f"grad of {name} has dtype {grad.dtype}"
        errors[f"grad {name}"] = relative_error(grad, expected_grads[name])
    bad = {k: f"{v:.2e}" for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol:.0e}: {bad}"


def _conv(dtype: torch.dtype) -> dict[str, torch.dtype]:
    return dict.fromkeys(CONV_FLOATS, dtype)


# --- the ground truth itself ------------------------------------------------------------


class TestNaive:
    def test_zero_offset_conv_is_conv2d(self) -> None:
        args = make_conv_inputs(
            c_in=6,
            c_out=4,
            h=6,
            w=9,
            kh=3,
            kw=5,
            stride=(2, 1),
            padding=(1, 2),
            dilation=(1, 2),
            groups=2,
            offset_groups=3,
            mask=False,
            offsets="zero",
        )
        expected = F.conv2d(
            args["input"], args["weight"], args["bias"], (2, 1), (1, 2), (1, 2), groups=2
        )
        torch.testing.assert_close(naive.deform_conv2d(**args), expected, rtol=1e-12, atol=1e-12)

    def test_integer_offset_shifts_the_input(self) -> None:
        args = make_conv_inputs(n=1, c_in=1, c_out=1, kh=1, kw=1, padding=0, offsets="zero")
        args.update(bias=None, mask=None, weight=torch.ones(1, 1, 1, 1, dtype=torch.float64))
        args["offset"][:, 0] = 1.0  # dy = +1: output row r reads input row r + 1
        out = naive.deform_conv2d(**args)
        torch.testing.assert_close(out[0, 0, :-1], args["input"][0, 0, 1:])
        assert out[0, 0, -1].abs().max() == 0

    def test_msda_pixel_centres_read_value(self) -> None:
        h, w, m, d = 3, 5, 2, 4
        value = torch.randn(1, h * w, m, d, dtype=torch.float64)
        ys, xs = torch.meshgrid(
            torch.arange(h, dtype=torch.float64),
            torch.arange(w, dtype=torch.float64),
            indexing="ij",
        )
        centre = torch.stack([(xs + 0.5) / w, (ys + 0.5) / h], -1).reshape(1, h * w, 1, 1, 1, 2)
        loc = centre.expand(1, h * w, m, 1, 1, 2)
        out = naive.multi_scale_deformable_attention(
            value,
            torch.tensor([[h, w]]),
            torch.tensor([0]),
            loc,
            torch.ones(1, h * w, m, 1, 1, dtype=torch.float64),
        )
        torch.testing.assert_close(out, value.reshape(1, h * w, m * d), rtol=0, atol=1e-15)

    def test_halfway_averages_neighbours(self) -> None:
        feature = torch.randn(1, 2, 3, 4, dtype=torch.float64)
        y = torch.tensor([[1.0, 1.5]], dtype=torch.float64)
        x = torch.tensor([[2.5, 3.0]], dtype=torch.float64)
        out = naive.bilinear(feature, y, x)
        torch.testing.assert_close(out[0, :, 0], (feature[0, :, 1, 2] + feature[0, :, 1, 3]) / 2)
        torch.testing.assert_close(out[0, :, 1], (feature[0, :, 1, 3] + feature[0, :, 2, 3]) / 2)

    def test_beyond_one_pixel_outside_is_zero(self) -> None:
        feature = torch.randn(1, 3, 4, 5, dtype=torch.float64)
        y = torch.tensor([[-1.0, -1.5, 4.0, 7.2, 1.0, 2.0, -3.0]], dtype=torch.float64)
        x = torch.tensor([[2.0, 1.0, 2.0, 1.0, -1.0, 5.0, 9.0]], dtype=torch.float64)
        y.requires_grad_()
        x.requires_grad_()
        out = naive.bilinear(feature, y, x)
        assert out.abs().max() == 0
        gy, gx = torch.autograd.grad(out.sum(), [y, x])
        assert gy.abs().max() == 0
        assert gx.abs().max() == 0

    def test_partly_outside_keeps_inside_corners(self) -> None:
        feature = torch.randn(1, 1, 2, 2, dtype=torch.float64)
        out = naive.bilinear(
            feature, torch.tensor([[-0.25]]).double(), torch.tensor([[0.0]]).double()
        )
        torch.testing.assert_close(out[0, 0, 0], 0.75 * feature[0, 0, 0, 0])

    def test_matches_grid_sample(self) -> None:
        feature = torch.randn(2, 3, 5, 7, dtype=torch.float64)
        y = torch.rand(2, 40, dtype=torch.float64) * 9 - 2
        x = torch.rand(2, 40, dtype=torch.float64) * 11 - 2
        grid = torch.stack([(2 * x + 1) / 7 - 1, (2 * y + 1) / 5 - 1], -1)[:, :, None]
        expected = F.grid_sample(feature, grid, align_corners=False)[..., 0]
        torch.testing.assert_close(naive.bilinear(feature, y, x), expected)


# --- deform_conv2d -------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_float64_matches_naive(backend: str, case: str) -> None:
    args = make_conv_inputs(**CONV_CASES[case])
    _compare_with_naive(
        deformops.deform_conv2d,
        naive.deform_conv2d,
        args,
        CONV_FLOATS,
        _conv(torch.float64),
        TOLERANCE[torch.float64],
    )


@pytest.mark.parametrize("case", CONV_DTYPE_CASES)
def test_conv_dtype_matches_naive(backend: str, dtype: torch.dtype, case: str) -> None:
    args = make_conv_inputs(**CONV_CASES[case])
    _compare_with_naive(
        deformops.deform_conv2d,
        naive.deform_conv2d,
        args,
        CONV_FLOATS,
        _conv(dtype),
        TOLERANCE[dtype],
    )


def test_conv_positional_order_and_int_or_pair(backend: str) -> None:
    args = make_conv_inputs(h=8, w=7, stride=2, padding=1, dilation=2)
    a = args
    keyword = deformops.deform_conv2d(**args)
    positional = deformops.deform_conv2d(
        a["input"], a["offset"], a["weight"], a["bias"], (2, 2), (1, 1), (2, 2), a["mask"]
    )
    torch.testing.assert_close(positional, keyword, rtol=0, atol=0)


def test_conv_mask_of_ones_is_no_mask(backend: str) -> None:
    args = make_conv_inputs(mask=False)
    ones = torch.ones(args["offset"].shape[0], 9, *args["offset"].shape[2:], dtype=torch.float64)
    torch.testing.assert_close(
        deformops.deform_conv2d(**{**args, "mask": ones}), deformops.deform_conv2d(**args)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_conv_channels_last(backend: str, dtype: torch.dtype) -> None:
    args = _cast(make_conv_inputs(n=2, c_in=4, c_out=6, h=5, w=7), _conv(dtype))
    out, grads, grad_output = _evaluate(deformops.deform_conv2d, args, CONV_FLOATS)
    last = dict(args, input=args["input"].contiguous(memory_format=torch.channels_last))
    assert not last["input"].is_contiguous()
    out_last, grads_last, _ = _evaluate(deformops.deform_conv2d, last, CONV_FLOATS, grad_output)
    assert out_last.is_contiguous(memory_format=torch.channels_last)
    assert not out_last.is_contiguous()
    torch.testing.assert_close(out_last, out)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_last[name], grad, msg=f"grad of {name}")


def test_conv_non_contiguous_arguments(backend: str) -> None:
    args = make_conv_inputs(c_in=4, c_out=6, h=5, w=6)
    strided = {
        k: v.transpose(-1, -2).contiguous().transpose(-1, -2) if k != "bias" else v
        for k, v in args.items()
        if isinstance(v, torch.Tensor)
    } | {k: args[k] for k in ("stride", "padding", "dilation")}
    strided["bias"] = torch.stack([args["bias"], args["bias"]], -1)[:, 0]
    assert not strided["offset"].is_contiguous()
    assert not strided["bias"].is_contiguous()
    _compare_with_naive(
        deformops.deform_conv2d,
        naive.deform_conv2d,
        strided,
        CONV_FLOATS,
        _conv(torch.float64),
        TOLERANCE[torch.float64],
    )


def test_conv_one_pixel_outside_has_zero_gradient(backend: str) -> None:
    """At exactly one pixel outside (y = -1 or x = -1) the sample and its gradient are 0."""
    args = make_conv_inputs(n=1, c_in=2, c_out=1, h=3, w=4, kh=1, kw=1, padding=0, offsets="zero")
    args["offset"][:, 0, 0, :] = -1.0  # row 0 samples y = -1
    args["offset"][:, 1, :, 0] = -1.0  # column 0 samples x = -1
    offset = args["offset"].requires_grad_()
    out = deformops.deform_conv2d(**args)
    (grad,) = torch.autograd.grad(out.sum(), offset)
    torch.testing.assert_close(out[0, 0, 0], args["bias"].expand(4), rtol=0, atol=0)
    assert grad[0, 0, 0].abs().max() == 0, f"d/dy at y = -1: {grad[0, 0, 0].tolist()}"
    assert grad[0, 1, :, 0].abs().max() == 0, f"d/dx at x = -1: {grad[0, 1, :, 0].tolist()}"


# --- multi_scale_deformable_attention ---------------------------------------------------


@pytest.mark.parametrize("case", list(MSDA_CASES))
def test_msda_float64_matches_naive(backend: str, case: str) -> None:
    args = make_msda_inputs(**MSDA_CASES[case])
    _compare_with_naive(
        deformops.multi_scale_deformable_attention,
        naive.multi_scale_deformable_attention,
        args,
        MSDA_FLOATS,
        dict.fromkeys(MSDA_FLOATS, torch.float64),
        TOLERANCE[torch.float64],
    )


@pytest.mark.parametrize("case", MSDA_DTYPE_CASES)
def test_msda_dtype_matches_naive(backend: str, dtype: torch.dtype, case: str) -> None:
    args = make_msda_inputs(**MSDA_CASES[case])
    _compare_with_naive(
        deformops.multi_scale_deformable_attention,
        naive.multi_scale_deformable_attention,
        args,
        MSDA_FLOATS,
        dict.fromkeys(MSDA_FLOATS, dtype),
        TOLERANCE[dtype],
    )


@pytest.mark.parametrize(
    "float32_args",
    [("sampling_locations", "attention_weights"), ("sampling_locations",), ("attention_weights",)],
    ids=["locations_and_weights", "locations", "weights"],
)
def test_msda_float32_locations_with_half_value(
    backend: str, half_dtype: torch.dtype, float32_args: tuple[str, ...]
) -> None:
    args = make_msda_inputs(levels=((6, 8), (3, 4)), d=8)
    dtypes = dict.fromkeys(MSDA_FLOATS, half_dtype) | dict.fromkeys(float32_args, torch.float32)
    _compare_with_naive(
        deformops.multi_scale_deformable_attention,
        naive.multi_scale_deformable_attention,
        args,
        MSDA_FLOATS,
        dtypes,
        TOLERANCE[half_dtype],
    )


def test_msda_non_contiguous_arguments(backend: str) -> None:
    args = make_msda_inputs()
    args["value"] = args["value"].transpose(2, 3).contiguous().transpose(2, 3)
    loc = args["sampling_locations"]
    args["sampling_locations"] = loc.transpose(1, 2).contiguous().transpose(1, 2)
    weights = args["attention_weights"]
    args["attention_weights"] = torch.stack([weights, weights], -1)[..., 0]
    for name in MSDA_FLOATS:
        assert not args[name].is_contiguous(), name
    _compare_with_naive(
        deformops.multi_scale_deformable_attention,
        naive.multi_scale_deformable_attention,
        args,
        MSDA_FLOATS,
        dict.fromkeys(MSDA_FLOATS, torch.float64),
        TOLERANCE[torch.float64],
    )


def test_msda_one_pixel_outside_has_zero_gradient(backend: str) -> None:
    """Pixel coordinate -1 (x = -0.5 / W) samples 0 with zero gradient, as the original."""
    args = make_msda_inputs(n=1, levels=((2, 4),), m=1, d=3, q=2, p=1)
    loc = torch.tensor([[-0.5 / 4, 0.5], [0.5, -0.5 / 2]], dtype=torch.float64)
    args["sampling_locations"] = loc.reshape(1, 2, 1, 1, 1, 2).requires_grad_()
    out = deformops.multi_scale_deformable_attention(**args)
    (grad,) = torch.autograd.grad(out.sum(), args["sampling_locations"])
    assert out.abs().max() == 0
    assert grad.abs().max() == 0, f"gradient at pixel -1: {grad.flatten().tolist()}"


# --- autograd, custom-op and compiler checks --------------------------------------------


def _small_conv() -> dict[str, Any]:
    return make_conv_inputs(n=1, c_in=2, c_out=1, h=2, w=3, offset_scale=1.5)


def _small_msda() -> dict[str, Any]:
    return make_msda_inputs(n=1, levels=((3, 4), (2, 2)), m=2, d=3, q=2, p=2)


def _requires_grad(args: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {
        k: v.detach().clone().requires_grad_() if k in names and v is not None else v
        for k, v in args.items()
    }


def test_conv_gradcheck(backend: str) -> None:
    args = _requires_grad(_small_conv(), CONV_FLOATS)
    names = [n for n in CONV_FLOATS if args[n] is not None]

    def fn(*tensors: torch.Tensor) -> torch.Tensor:
        return deformops.deform_conv2d(**{**args, **dict(zip(names, tensors, strict=True))})

    assert torch.autograd.gradcheck(fn, [args[n] for n in names])


def test_msda_gradcheck(backend: str) -> None:
    args = _requires_grad(_small_msda(), MSDA_FLOATS)

    def fn(*tensors: torch.Tensor) -> torch.Tensor:
        return deformops.multi_scale_deformable_attention(
            **{**args, **dict(zip(MSDA_FLOATS, tensors, strict=True))}
        )

    assert torch.autograd.gradcheck(fn, [args[n] for n in MSDA_FLOATS])


def _detached(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


class _RecordDeformops(TorchDispatchMode):
    """Records every call of a ``deformops`` operator."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "deformops":
            self.calls.append(
                (
                    func,
                    tuple(_detached(a) for a in args),
                    {k: _detached(v) for k, v in kwargs.items()},
                )
            )
        return func(*args, **kwargs)


def _opcheck_with_backward(op: Any, args: tuple[Any, ...], backward_name: str) -> None:
    torch.library.opcheck(op, args)
    inputs = tuple(
        _detached(a).requires_grad_()
        if isinstance(a, torch.Tensor) and a.is_floating_point()
        else a
        for a in args
    )
    with _RecordDeformops() as recorder:
        out = op(*inputs)
        out.backward(torch.randn_like(out))
    backward = [(f, a, k) for f, a, k in recorder.calls if backward_name in f.name()]
    assert backward, f"no {backward_name} call seen in: {[f.name() for f, _, _ in recorder.calls]}"
    for func, b_args, b_kwargs in backward:
        torch.library.opcheck(func, b_args, b_kwargs)


def test_conv_opcheck(backend: str) -> None:
    a = _requires_grad(_small_conv(), CONV_FLOATS)
    args = (a["input"], a["offset"], a["weight"], a["mask"], a["bias"], 1, 1, 1, 1, 1, 1)
    _opcheck_with_backward(
        torch.ops.deformops.deform_conv2d.default, args, "deformops::deform_conv2d_backward"
    )
    b = _requires_grad(
        make_conv_inputs(
            n=1,
            c_in=2,
            c_out=2,
            h=4,
            w=5,
            stride=(2, 1),
            padding=(0, 1),
            dilation=(1, 2),
            mask=False,
            bias=False,
        ),
        CONV_FLOATS,
    )
    no_mask = (b["input"], b["offset"], b["weight"], None, None, 2, 1, 0, 1, 1, 2)
    _opcheck_with_backward(
        torch.ops.deformops.deform_conv2d.default, no_mask, "deformops::deform_conv2d_backward"
    )


def test_msda_opcheck(backend: str) -> None:
    a = _requires_grad(_small_msda(), MSDA_FLOATS)
    args = tuple(
        a[k]
        for k in (
            "value",
            "spatial_shapes",
            "level_start_index",
            "sampling_locations",
            "attention_weights",
        )
    )
    _opcheck_with_backward(
        torch.ops.deformops.multi_scale_deformable_attention.default,
        args,
        "deformops::multi_scale_deformable_attention_backward",
    )


def _compiled_equals_eager(
    fn: Callable[..., torch.Tensor], args: dict[str, Any], names: tuple[str, ...], backend: str
) -> None:
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    out, grads, grad_output = _evaluate(fn, args, names)
    out_c, grads_c, _ = _evaluate(compiled, args, names, grad_output)
    torch.testing.assert_close(out_c, out)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_c[name], grad, msg=f"grad of {name}")


def _conv_fn(**kwargs: Any) -> torch.Tensor:
    return deformops.deform_conv2d(**kwargs).relu() * 2


def _msda_fn(**kwargs: Any) -> torch.Tensor:
    return deformops.multi_scale_deformable_attention(**kwargs).tanh() + 1


@pytest.fixture
def fresh_dynamo() -> None:
    torch._dynamo.reset()


@pytest.mark.usefixtures("fresh_dynamo")
def test_conv_compile_fullgraph(backend: str) -> None:
    args = _cast(make_conv_inputs(stride=(2, 1), padding=(1, 0)), _conv(torch.float32))
    _compiled_equals_eager(_conv_fn, args, CONV_FLOATS, "aot_eager")


@pytest.mark.usefixtures("fresh_dynamo")
def test_msda_compile_fullgraph(backend: str) -> None:
    args = _cast(make_msda_inputs(), dict.fromkeys(MSDA_FLOATS, torch.float32))
    _compiled_equals_eager(_msda_fn, args, MSDA_FLOATS, "aot_eager")


@pytest.mark.usefixtures("fresh_dynamo")
def test_msda_compile_inductor() -> None:
    args = _cast(make_msda_inputs(), dict.fromkeys(MSDA_FLOATS, torch.float32))
    _compiled_equals_eager(_msda_fn, args, MSDA_FLOATS, "inductor")


# --- empty inputs and double backward ---------------------------------------------------


def _assert_empty_ok(
    fn: Callable[..., torch.Tensor],
    args: dict[str, Any],
    names: tuple[str, ...],
    expected_shape: tuple[int, ...],
) -> None:
    out, grads, _ = _evaluate(fn, args, names)
    assert tuple(out.shape) == expected_shape
    for name, grad in grads.items():
        assert grad.shape == args[name].shape, f"grad of {name}"
        assert grad.dtype == args[name].dtype, f"grad of {name}"
        assert not grad.any(), f"grad of {name} is not zero"


def test_conv_empty_batch(backend: str) -> None:
    args = make_conv_inputs(n=0, c_in=4, c_out=6, h=5, w=7)
    _assert_empty_ok(deformops.deform_conv2d, args, CONV_FLOATS, (0, 6, 5, 7))


def test_conv_zero_output_channels(backend: str) -> None:
    args = make_conv_inputs(n=2, c_in=4, c_out=0, h=5, w=7)
    _assert_empty_ok(deformops.deform_conv2d, args, CONV_FLOATS, (2, 0, 5, 7))


def test_msda_empty_batch(backend: str) -> None:
    args = make_msda_inputs(n=0, m=2, d=4)
    _assert_empty_ok(deformops.multi_scale_deformable_attention, args, MSDA_FLOATS, (0, 5, 8))


def test_msda_zero_queries(backend: str) -> None:
    args = make_msda_inputs(n=2, q=0, m=2, d=4)
    _assert_empty_ok(deformops.multi_scale_deformable_attention, args, MSDA_FLOATS, (2, 0, 8))


def _second_derivative(
    fn: Callable[..., torch.Tensor], args: dict[str, Any], names: tuple[str, ...]
) -> None:
    args = _requires_grad(args, names)
    inputs = [args[n] for n in names if args[n] is not None]
    out = fn(**args)
    grads = torch.autograd.grad((out * out).sum(), inputs, create_graph=True)
    second = sum(g.square().sum() for g in grads if g is not None)
    torch.autograd.grad(second, inputs, allow_unused=True)


def test_conv_double_backward_raises(backend: str) -> None:
    with pytest.raises(RuntimeError, match=r"(?i)double backward|create_graph"):
        _second_derivative(deformops.deform_conv2d, _small_conv(), CONV_FLOATS)


def test_msda_double_backward_raises(backend: str) -> None:
    with pytest.raises(RuntimeError, match=r"(?i)double backward|create_graph"):
        _second_derivative(deformops.multi_scale_deformable_attention, _small_msda(), MSDA_FLOATS)
