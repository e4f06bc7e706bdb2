"""Every class of bad input raises ValueError or TypeError naming the argument.

Each case perturbs one argument of otherwise valid inputs and expects the exception type
and the perturbed argument's name in the message; shape errors must also quote the shape
that was passed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from conftest import make_conv_inputs, make_msda_inputs

import deformops
from deformops.nn import DeformAttn2d, DeformConv2d

Args = dict[str, Any]
META = torch.device("meta")


@contextmanager
def raises(
    exc: type[Exception] | tuple[type[Exception], ...], name: str, got: str | None = None
) -> Iterator[None]:
    """Expects ``exc`` whose message names ``name`` (and quotes ``got`` when given)."""
    with pytest.raises(exc, match=rf"(?<![\w.])({re.escape(name)})(?![\w])") as info:
        yield
    if got is not None:
        assert got in str(info.value), f"{got!r} not quoted in: {info.value}"


def _quoted(shape: torch.Size) -> str:
    """How a shape appears in a message, as a tuple, a list or a ``torch.Size``."""
    return ", ".join(str(s) for s in shape)


def _conv_args() -> Args:
    args = make_conv_inputs(n=2, c_in=4, c_out=6, h=5, w=7)
    return {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def _msda_args() -> Args:
    args = make_msda_inputs(n=2, levels=((4, 6), (3, 2), (1, 1)), m=2, d=4, q=5, p=3)
    return {k: v.float() if v.is_floating_point() else v for k, v in args.items()}


def _set(name: str, make: Callable[[Any], Any]) -> Callable[[Args], Args]:
    """A perturbation replacing argument ``name`` by ``make(old value)``."""
    return lambda args: {**args, name: make(args[name])}


def _offset_channels(channels: int) -> Callable[[Args], Args]:
    return _set("offset", lambda o: torch.randn(o.shape[0], channels, *o.shape[2:]))


def _reshape(name: str, shape: tuple[int, ...]) -> Callable[[Args], Args]:
    return _set(name, lambda t: torch.zeros(shape, dtype=t.dtype))


# Base conv shapes: input [2, 4, 5, 7], offset [2, 18, 5, 7], weight [6, 4, 3, 3],
# mask [2, 9, 5, 7], bias [6]; stride 1, padding 1, dilation 1.
CONV_SHAPE_ERRORS = {
    "input_rank_3": ("input", _reshape("input", (4, 5, 7))),
    "input_rank_5": ("input", _reshape("input", (1, 2, 4, 5, 7))),
    "offset_rank_3": ("offset", _reshape("offset", (2, 18, 35))),
    "weight_rank_3": ("weight", _reshape("weight", (6, 4, 9))),
    "mask_rank_3": ("mask", _reshape("mask", (2, 9, 35))),
    "bias_rank_2": ("bias", _reshape("bias", (6, 1))),
    "offset_batch": ("offset", _reshape("offset", (1, 18, 5, 7))),
    "offset_height": ("offset", _reshape("offset", (2, 18, 4, 7))),
    "offset_width": ("offset", _reshape("offset", (2, 18, 5, 8))),
    "offset_channels_odd": ("offset", _offset_channels(19)),
    "offset_channels_not_multiple_of_2k": ("offset", _offset_channels(20)),
    "offset_groups_not_dividing_c_in": ("offset", _offset_channels(2 * 3 * 9)),
    "weight_groups_not_dividing_c_in": ("weight", _reshape("weight", (6, 3, 3, 3))),
    "mask_channels": ("mask", _reshape("mask", (2, 10, 5, 7))),
    "mask_batch": ("mask", _reshape("mask", (1, 9, 5, 7))),
    "mask_spatial": ("mask", _reshape("mask", (2, 9, 7, 5))),
    "mask_channels_for_offset_groups": ("mask", _reshape("mask", (2, 18, 5, 7))),
    "bias_size": ("bias", _reshape("bias", (7,))),
}


@pytest.mark.parametrize("case", list(CONV_SHAPE_ERRORS))
def test_conv_shape_errors(case: str) -> None:
    name, perturb = CONV_SHAPE_ERRORS[case]
    args = perturb(_conv_args())
    with raises(ValueError, name, _quoted(args[name].shape)):
        deformops.deform_conv2d(**args)


def test_conv_c_out_not_divisible_by_groups() -> None:
    args = {**_conv_args(), "weight": torch.randn(5, 2, 3, 3)}
    with raises(ValueError, "weight", "5"):
        deformops.deform_conv2d(**args)


def test_conv_input_smaller_than_kernel() -> None:
    args = {**_conv_args(), "input": torch.randn(2, 4, 1, 1), "padding": 0}
    with raises(ValueError, "input", "1, 1"):
        deformops.deform_conv2d(**args)


CONV_TYPE_ERRORS = {
    "offset_float64": ("offset", _set("offset", lambda t: t.double())),
    "weight_float64": ("weight", _set("weight", lambda t: t.double())),
    "mask_float16": ("mask", _set("mask", lambda t: t.half())),
    "bias_bfloat16": ("bias", _set("bias", lambda t: t.bfloat16())),
    "input_int64": ("input", _set("input", lambda t: t.long())),
    "offset_int32": ("offset", _set("offset", lambda t: t.int())),
    "weight_int64": ("weight", _set("weight", lambda t: t.long())),
    "mask_bool": ("mask", _set("mask", lambda t: t > 0.5)),
    "input_list": ("input", _set("input", lambda t: t.tolist())),
    "offset_numpy": ("offset", _set("offset", lambda t: t.numpy())),
    "weight_float": ("weight", _set("weight", lambda t: 1.0)),
    "bias_list": ("bias", _set("bias", lambda t: t.tolist())),
    "stride_float": ("stride", _set("stride", lambda s: 1.5)),
    "padding_string": ("padding", _set("padding", lambda p: "same")),
}


@pytest.mark.parametrize("case", list(CONV_TYPE_ERRORS))
def test_conv_type_errors(case: str) -> None:
    name, perturb = CONV_TYPE_ERRORS[case]
    with raises(TypeError, name):
        deformops.deform_conv2d(**perturb(_conv_args()))


def test_conv_half_input_with_float32_others_is_rejected() -> None:
    args = _conv_args()
    args["input"] = args["input"].half()
    with pytest.raises(TypeError, match=r"weight|offset"):
        deformops.deform_conv2d(**args)


@pytest.mark.parametrize("name", ["offset", "weight", "mask", "bias"])
def test_conv_mixed_devices(name: str) -> None:
    args = _conv_args()
    args[name] = args[name].to(META)
    with raises(ValueError, name):
        deformops.deform_conv2d(**args)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("padding", -1),
        ("padding", (1, -1)),
        ("stride", 0),
        ("stride", -1),
        ("stride", (1, 0)),
        ("dilation", 0),
        ("dilation", (-2, 1)),
    ],
)
def test_conv_bad_hyperparameters(name: str, value: Any) -> None:
    with raises(ValueError, name):
        deformops.deform_conv2d(**{**_conv_args(), name: value})


@pytest.mark.parametrize("name", ["stride", "padding", "dilation"])
def test_conv_hyperparameter_of_wrong_length(name: str) -> None:
    with raises((TypeError, ValueError), name):
        deformops.deform_conv2d(**{**_conv_args(), name: (1, 1, 1)})


# Base MSDA shapes: value [2, 31, 2, 4], spatial_shapes [[4, 6], [3, 2], [1, 1]],
# level_start_index [0, 24, 30], sampling_locations [2, 5, 2, 3, 3, 2],
# attention_weights [2, 5, 2, 3, 3].
def _index(values: list[Any]) -> Callable[[Any], torch.Tensor]:
    return lambda _: torch.tensor(values, dtype=torch.int64)


MSDA_SHAPE_ERRORS = {
    "value_rank_3": ("value", _reshape("value", (2, 31, 8))),
    "spatial_shapes_rank_1": ("spatial_shapes", _set("spatial_shapes", _index([4, 6, 3, 2, 1, 1]))),
    "spatial_shapes_last_dim_3": (
        "spatial_shapes",
        _set("spatial_shapes", _index([[4, 6, 1], [3, 2, 1], [1, 1, 1]])),
    ),
    "level_start_index_rank_2": (
        "level_start_index",
        _set("level_start_index", _index([[0], [24], [30]])),
    ),
    "level_start_index_length": ("level_start_index", _set("level_start_index", _index([0, 24]))),
    "sampling_locations_rank_5": (
        "sampling_locations",
        _reshape("sampling_locations", (2, 5, 2, 3, 6)),
    ),
    "sampling_locations_last_dim_3": (
        "sampling_locations",
        _reshape("sampling_locations", (2, 5, 2, 3, 3, 3)),
    ),
    "sampling_locations_last_dim_1": (
        "sampling_locations",
        _reshape("sampling_locations", (2, 5, 2, 3, 3, 1)),
    ),
    "sampling_locations_batch": (
        "sampling_locations",
        _reshape("sampling_locations", (1, 5, 2, 3, 3, 2)),
    ),
    "sampling_locations_heads": (
        "sampling_locations",
        _reshape("sampling_locations", (2, 5, 3, 3, 3, 2)),
    ),
    "sampling_locations_levels": (
        "sampling_locations",
        _reshape("sampling_locations", (2, 5, 2, 2, 3, 2)),
    ),
    "attention_weights_rank_4": ("attention_weights", _reshape("attention_weights", (2, 5, 2, 9))),
    "attention_weights_rank_6": (
        "attention_weights",
        _reshape("attention_weights", (2, 5, 2, 3, 3, 1)),
    ),
    "attention_weights_points": (
        "attention_weights",
        _reshape("attention_weights", (2, 5, 2, 3, 4)),
    ),
    "attention_weights_queries": (
        "attention_weights",
        _reshape("attention_weights", (2, 6, 2, 3, 3)),
    ),
    "attention_weights_heads": (
        "attention_weights",
        _reshape("attention_weights", (2, 5, 1, 3, 3)),
    ),
    "attention_weights_levels": (
        "attention_weights",
        _reshape("attention_weights", (2, 5, 2, 2, 3)),
    ),
}


@pytest.mark.parametrize("case", list(MSDA_SHAPE_ERRORS))
def test_msda_shape_errors(case: str) -> None:
    name, perturb = MSDA_SHAPE_ERRORS[case]
    args = perturb(_msda_args())
    with raises(ValueError, name, _quoted(args[name].shape)):
        deformops.multi_scale_deformable_attention(**args)


def test_msda_value_length_disagrees_with_spatial_shapes() -> None:
    args = {**_msda_args(), "value": torch.randn(2, 32, 2, 4)}
    with raises(ValueError, "value", "32"):
        deformops.multi_scale_deformable_attention(**args)


MSDA_VALUE_ERRORS = {
    "spatial_shapes_disagree_with_value": (
        "spatial_shapes",
        _set("spatial_shapes", _index([[4, 6], [3, 3], [1, 1]])),
    ),
    "spatial_shapes_negative": (
        "spatial_shapes",
        _set("spatial_shapes", _index([[4, 6], [-3, -2], [1, 1]])),
    ),
    "level_start_index_wrong_values": (
        "level_start_index",
        _set("level_start_index", _index([0, 24, 29])),
    ),
    "level_start_index_unsorted": (
        "level_start_index",
        _set("level_start_index", _index([24, 0, 30])),
    ),
}


@pytest.mark.parametrize("case", list(MSDA_VALUE_ERRORS))
def test_msda_level_value_errors(case: str) -> None:
    name, perturb = MSDA_VALUE_ERRORS[case]
    with raises(ValueError, name):
        deformops.multi_scale_deformable_attention(**perturb(_msda_args()))


MSDA_TYPE_ERRORS = {
    "value_int64": ("value", _set("value", lambda t: t.long())),
    "value_list": ("value", _set("value", lambda t: t.tolist())),
    "spatial_shapes_float": ("spatial_shapes", _set("spatial_shapes", lambda t: t.float())),
    "spatial_shapes_list": ("spatial_shapes", _set("spatial_shapes", lambda t: t.tolist())),
    "level_start_index_float": (
        "level_start_index",
        _set("level_start_index", lambda t: t.double()),
    ),
    "sampling_locations_float64": (
        "sampling_locations",
        _set("sampling_locations", lambda t: t.double()),
    ),
    "sampling_locations_int": (
        "sampling_locations",
        _set("sampling_locations", lambda t: t.long()),
    ),
    "attention_weights_float16": (
        "attention_weights",
        _set("attention_weights", lambda t: t.half()),
    ),
    "attention_weights_bool": ("attention_weights", _set("attention_weights", lambda t: t > 0.5)),
    "attention_weights_numpy": (
        "attention_weights",
        _set("attention_weights", lambda t: t.numpy()),
    ),
}


@pytest.mark.parametrize("case", list(MSDA_TYPE_ERRORS))
def test_msda_type_errors(case: str) -> None:
    name, perturb = MSDA_TYPE_ERRORS[case]
    with raises(TypeError, name):
        deformops.multi_scale_deformable_attention(**perturb(_msda_args()))


def test_msda_half_value_rejects_other_half_locations() -> None:
    args = _msda_args()
    args["value"] = args["value"].half()
    args["sampling_locations"] = args["sampling_locations"].bfloat16()
    with raises(TypeError, "sampling_locations"):
        deformops.multi_scale_deformable_attention(**args)


@pytest.mark.parametrize("name", ["sampling_locations", "attention_weights"])
def test_msda_mixed_devices(name: str) -> None:
    args = _msda_args()
    args[name] = args[name].to(META)
    with raises(ValueError, name):
        deformops.multi_scale_deformable_attention(**args)


# --- modules ----------------------------------------------------------------------------


def test_deform_conv_wrong_channels() -> None:
    layer = DeformConv2d(4)
    with raises(ValueError, "input"):
        layer(torch.randn(2, 3, 5, 5))


def test_deform_conv_explicit_offset_of_wrong_shape() -> None:
    layer = DeformConv2d(4)
    with raises(ValueError, "offset"):
        layer(torch.randn(2, 4, 5, 5), torch.zeros(2, 18, 4, 5))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"in_channels": 6, "groups": 4}, "groups"),
        ({"in_channels": 6, "out_channels": 5, "groups": 2}, "groups"),
        ({"in_channels": 6, "offset_groups": 4}, "offset_groups"),
        ({"in_channels": 0}, "in_channels"),
    ],
)
def test_deform_conv_bad_construction(kwargs: dict[str, int], name: str) -> None:
    with raises(ValueError, name):
        DeformConv2d(**kwargs)


def test_deform_attn_embed_dim_not_divisible() -> None:
    with pytest.raises(ValueError, match=r"embed_dim|num_heads"):
        DeformAttn2d(embed_dim=30, num_heads=8)


def _attn_inputs(
    n: int = 2, q: int = 3, c: int = 16, levels: tuple[tuple[int, int], ...] = ((4, 4), (2, 3))
) -> dict[str, Any]:
    shapes = torch.tensor(levels)
    sizes = [h * w for h, w in levels]
    return {
        "query": torch.randn(n, q, c),
        "reference_points": torch.rand(n, q, len(levels), 2),
        "value": torch.randn(n, sum(sizes), c),
        "spatial_shapes": shapes,
        "level_start_index": torch.tensor([sum(sizes[:i]) for i in range(len(sizes))]),
    }


def _attn() -> DeformAttn2d:
    return DeformAttn2d(embed_dim=16, num_heads=2, num_levels=2, num_points=2)


ATTN_ERRORS = {
    "query_channels": ("query", lambda a: {**a, "query": torch.randn(2, 3, 12)}),
    "value_channels": ("value", lambda a: {**a, "value": torch.randn(2, 22, 12)}),
    "reference_points_levels": (
        "reference_points",
        lambda a: {**a, "reference_points": torch.rand(2, 3, 3, 2)},
    ),
    "reference_points_last_dim": (
        "reference_points",
        lambda a: {**a, "reference_points": torch.rand(2, 3, 2, 3)},
    ),
    "spatial_shapes_levels": (
        "spatial_shapes",
        lambda a: {
            **_attn_inputs(levels=((4, 4), (2, 3), (1, 1))),
            "reference_points": a["reference_points"],
        },
    ),
    "value_maps_count": (
        "value",
        lambda a: {
            **a,
            "value": [torch.randn(2, 16, 4, 4), torch.randn(2, 16, 2, 3), torch.randn(2, 16, 1, 1)],
            "spatial_shapes": None,
            "level_start_index": None,
        },
    ),
    "value_maps_channels": (
        "value",
        lambda a: {
            **a,
            "value": [torch.randn(2, 16, 4, 4), torch.randn(2, 8, 2, 3)],
            "spatial_shapes": None,
            "level_start_index": None,
        },
    ),
    "padding_mask_shape": (
        "padding_mask",
        lambda a: {**a, "padding_mask": torch.zeros(2, 21, dtype=torch.bool)},
    ),
}


@pytest.mark.parametrize("case", list(ATTN_ERRORS))
def test_deform_attn_errors(case: str) -> None:
    name, perturb = ATTN_ERRORS[case]
    args = perturb(_attn_inputs())
    with raises(ValueError, name):
        _attn()(**args)


def test_level_tables_are_checked_again_after_an_in_place_change() -> None:
    """A consistent (spatial_shapes, level_start_index) pair is checked once; changing
    either in place makes the next call check it again."""
    shapes = torch.tensor([[4, 5], [2, 3]])
    starts = torch.tensor([0, 20])
    value = torch.randn(1, 26, 2, 3)
    loc = torch.rand(1, 4, 2, 2, 1, 2)
    weights = torch.rand(1, 4, 2, 2, 1)
    deformops.multi_scale_deformable_attention(value, shapes, starts, loc, weights)
    starts[1] = 19
    with pytest.raises(ValueError, match="level_start_index"):
        deformops.multi_scale_deformable_attention(value, shapes, starts, loc, weights)
    starts[1] = 20
    shapes[1, 1] = 4
    with pytest.raises(ValueError, match="value"):
        deformops.multi_scale_deformable_attention(value, shapes, starts, loc, weights)
