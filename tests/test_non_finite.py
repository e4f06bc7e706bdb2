"""Non-finite numbers in the inputs, on every backend: where they may go and where not.

- A sampling location (MSDA location, convolution offset, RoI bin offset) that is NaN or
  infinite samples zero and takes zero gradient, exactly as a location far outside the map.
- A NaN or infinite value at a pixel that no sample covers reaches nothing: a corner
  outside the map is zero, never the value at position 0 times a zero weight.
- A NaN attention weight or mask scales its own sample only: the other outputs, and the
  value gradient away from that sample's four corners, are those of the finite inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import DEVICES, make_conv_inputs, make_msda_inputs
from test_deform_roi_pool import make_roi_inputs

import deformops

DTYPES = (torch.float32, torch.float64)

# Every test runs on each device and dtype.
pytestmark = [
    pytest.mark.parametrize("device", DEVICES),
    pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch.")),
]
NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
# Entries of the locations set to a non-finite number (and, for the comparison, far away).
MSDA_LOCATIONS = ((0, 1, 0, 0, 0, 0), (1, 2, 1, 1, 1, 1), (0, 4, 1, 2, 2, 0))
CONV_OFFSETS = ((0, 0, 1, 1), (1, 3, 2, 2), (0, 17, 4, 6))
ROI_OFFSETS = ((4, 0, 1, 1), (5, 1, 2, 3), (6, 0, 0, 0))  # RoIs of positive size


def _run(op: Callable[..., torch.Tensor], args: dict[str, Any], grads: tuple[str, ...]):
    """Output and gradients of ``op(**args)`` with respect to ``grads``, for a fixed
    upstream gradient."""
    args = {
        k: v.clone().requires_grad_(k in grads) if torch.is_tensor(v) else v
        for k, v in args.items()
    }
    out = op(**args)
    upstream = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device)
    upstream = upstream.reshape(out.shape)
    out.backward(upstream)
    return {"output": out.detach(), **{k: args[k].grad for k in grads}}


def _assert_same(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where=None
) -> None:
    """``actual`` equals ``expected`` (where ``where[name]`` is True, when given): exactly on
    the CPU; on CUDA, whose atomics add in any order, to the dtype's default tolerance."""
    exact = {"rtol": 0, "atol": 0} if next(iter(expected.values())).device.type == "cpu" else {}
    for name, tensor in expected.items():
        a, e = actual[name], tensor
        if where is not None:
            a, e = a[where[name]], e[where[name]]
        assert torch.isfinite(a).all(), f"{name}: not finite"
        torch.testing.assert_close(a, e, **exact, msg=name)


def _cast(args: dict[str, Any], dtype: torch.dtype, device: str) -> dict[str, Any]:
    """Every tensor of ``args`` on ``device``, the floating ones in ``dtype``."""
    return {
        k: v.to(device, dtype if v.is_floating_point() else v.dtype) if torch.is_tensor(v) else v
        for k, v in args.items()
    }


def _msda(**kwargs: Any) -> torch.Tensor:
    return deformops.multi_scale_deformable_attention(**kwargs)


MSDA_GRADS = ("value", "sampling_locations", "attention_weights")
CONV_GRADS = ("input", "offset", "weight", "mask", "bias")
ROI_GRADS = ("input", "offset")


def _located_cases() -> dict[str, tuple[Callable, dict[str, Any], str, tuple, tuple, float]]:
    """Per operator: op, inputs, the location argument, its entries, gradients, far value."""
    return {
        "msda": (
            _msda,
            make_msda_inputs(),
            "sampling_locations",
            MSDA_LOCATIONS,
            MSDA_GRADS,
            -10.0,
        ),
        "conv": (
            deformops.deform_conv2d,
            make_conv_inputs(),
            "offset",
            CONV_OFFSETS,
            CONV_GRADS,
            -1e3,
        ),
        "roi": (
            deformops.deform_roi_pool,
            make_roi_inputs(),
            "offset",
            ROI_OFFSETS,
            ROI_GRADS,
            1e3,
        ),
    }


@pytest.mark.parametrize("number", list(NON_FINITE))
@pytest.mark.parametrize("op", ["msda", "conv", "roi"])
def test_non_finite_location_samples_zero(
    backend: str, op: str, number: str, dtype: torch.dtype, device: str
) -> None:
    """A non-finite location gives the results of a location far outside the map."""
    fn, args, name, entries, grads, far = _located_cases()[op]
    args = _cast(args, dtype, device)
    bad, away = dict(args), dict(args)
    bad[name], away[name] = args[name].clone(), args[name].clone()
    for entry in entries:
        bad[name][entry] = NON_FINITE[number]
        away[name][entry] = far
    actual, expected = _run(fn, bad, grads), _run(fn, away, grads)
    for entry in entries:
        assert actual[name][entry] == 0
    _assert_same(actual, expected)


def _uncovered_cases() -> dict[str, tuple[Callable, dict[str, Any], tuple[str, tuple], tuple]]:
    """Per operator: op, inputs whose samples cover no pixel of row 0 and column 0 of the
    first map (many fall outside the map beyond its last row or column), the value entries
    of that pixel (0, 0) to poison, and the gradients."""
    msda = make_msda_inputs(levels=((6, 8), (3, 2), (1, 1)))
    # Level 0 pixels x*8 - 0.5 and y*6 - 0.5 from 1.9 and 1.3: beyond column and row 1; the
    # other levels start after pixel (0, 0) of level 0.
    msda["sampling_locations"] = torch.rand_like(msda["sampling_locations"]) * 1.2 + 0.3
    conv = make_conv_inputs(h=6, w=7)
    # Every point 1 to 7 pixels down and right of its kernel position (rows and columns -1
    # and up): at row and column 1 or beyond.
    conv["offset"] = torch.rand_like(conv["offset"]) * 6 + 2.0
    roi = make_roi_inputs(h=9, w=11, spatial_scale=1.0)
    roi["rois"][:, 1:] = torch.tensor([3.0, 3.0, 14.0, 12.0])  # to beyond the last row and column
    roi["offset"] = torch.rand_like(roi["offset"]) * 2
    return {
        "msda": (_msda, msda, ("value", (slice(None), 0)), MSDA_GRADS),
        "conv": (
            deformops.deform_conv2d,
            conv,
            ("input", (slice(None), slice(None), 0, 0)),
            CONV_GRADS,
        ),
        "roi": (
            deformops.deform_roi_pool,
            roi,
            ("input", (slice(None), slice(None), 0, 0)),
            ROI_GRADS,
        ),
    }


@pytest.mark.parametrize("number", list(NON_FINITE))
@pytest.mark.parametrize("op", ["msda", "conv", "roi"])
def test_non_finite_value_no_sample_covers_reaches_nothing(
    backend: str, op: str, number: str, dtype: torch.dtype, device: str
) -> None:
    """A non-finite input value that no sample covers changes no result."""
    fn, args, (name, entry), grads = _uncovered_cases()[op]
    args = _cast(args, dtype, device)
    bad = dict(args)
    bad[name] = args[name].clone()
    bad[name][entry] = NON_FINITE[number]
    _assert_same(_run(fn, bad, grads), _run(fn, args, grads))


def _msda_nan_weight():
    """MSDA inputs with attention weight (n, q, m, l, p) = (1, 2, 1, 0, 1) NaN, and where
    each result may differ from the finite inputs': that output row, the sample's own
    location and weight gradients, and the value gradient at its four corners."""
    args = make_msda_inputs(levels=((6, 8), (3, 2)))
    n, q, m, level, p = 1, 2, 1, 0, 1
    args["sampling_locations"][n, q, m, level, p] = torch.tensor([0.4, 0.55], dtype=torch.float64)
    height, width = (int(s) for s in args["spatial_shapes"][level])
    start = int(args["level_start_index"][level])
    x, y = args["sampling_locations"][n, q, m, level, p] * torch.tensor([width, height]) - 0.5
    d = args["value"].shape[-1]
    may_differ = {k: torch.zeros_like(args[k], dtype=torch.bool) for k in MSDA_GRADS}
    may_differ["output"] = torch.zeros(
        args["value"].shape[0],
        args["sampling_locations"].shape[1],
        args["value"].shape[2] * d,
        dtype=torch.bool,
    )
    may_differ["output"][n, q, m * d : (m + 1) * d] = True
    may_differ["sampling_locations"][n, q, m, level, p] = True
    may_differ["attention_weights"][n, q, m, level, p] = True
    for row in (math.floor(y), math.floor(y) + 1):
        for col in (math.floor(x), math.floor(x) + 1):
            may_differ["value"][n, start + row * width + col, m] = True
    bad = dict(args)
    bad["attention_weights"] = args["attention_weights"].clone()
    bad["attention_weights"][n, q, m, level, p] = math.nan
    return _msda, args, bad, may_differ, MSDA_GRADS


def _conv_nan_mask():
    """Convolution inputs with mask (n, k, ho, wo) = (1, 4, 2, 3) NaN (kernel point (1, 1),
    offset (0.3, 0.6)), and where each result may differ: that output pixel, the point's
    offset and mask gradients, the weight gradient of kernel point (1, 1), and the input
    gradient at the point's four corners."""
    args = make_conv_inputs(h=6, w=7)
    n, k, ho, wo = 1, 4, 2, 3
    args["offset"][n, 2 * k : 2 * k + 2, ho, wo] = torch.tensor([0.3, 0.6], dtype=torch.float64)
    y, x = ho - 1 + 1 + 0.3, wo - 1 + 1 + 0.6  # stride 1, padding 1, kernel point (1, 1)
    may_differ = {k_: torch.zeros_like(args[k_], dtype=torch.bool) for k_ in CONV_GRADS}
    may_differ["output"] = torch.zeros(2, 6, 6, 7, dtype=torch.bool)
    may_differ["output"][n, :, ho, wo] = True
    may_differ["offset"][n, 2 * k : 2 * k + 2, ho, wo] = True
    may_differ["mask"][n, k, ho, wo] = True
    may_differ["weight"][:, :, 1, 1] = True
    for row in (math.floor(y), math.floor(y) + 1):
        for col in (math.floor(x), math.floor(x) + 1):
            may_differ["input"][n, :, row, col] = True
    bad = dict(args)
    bad["mask"] = args["mask"].clone()
    bad["mask"][n, k, ho, wo] = math.nan
    return deformops.deform_conv2d, args, bad, may_differ, CONV_GRADS


@pytest.mark.parametrize("case", [_msda_nan_weight, _conv_nan_mask], ids=["msda", "conv"])
def test_nan_multiplier_stays_in_its_sample(
    backend: str, case: Callable, dtype: torch.dtype, device: str
) -> None:
    """A NaN attention weight or mask makes its output NaN and changes nothing else but its
    own sample's gradients."""
    fn, args, bad, may_differ, grads = case()
    actual = _run(fn, _cast(bad, dtype, device), grads)
    expected = _run(fn, _cast(args, dtype, device), grads)
    may_differ = {k: v.to(device) for k, v in may_differ.items()}
    assert torch.isnan(actual["output"][may_differ["output"]]).all()
    _assert_same(actual, expected, {k: ~v for k, v in may_differ.items()})
