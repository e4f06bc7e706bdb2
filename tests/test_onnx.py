"""ONNX export with :mod:`deformops.onnx`: standard operators only, onnxruntime (CPU) matches eager.

Every graph is exported with ``torch.onnx.export(..., custom_translation_table=...)`` in
float32, checked to hold only operators of the standard domain, and run in onnxruntime,
whose outputs must be within ``1e-4`` of eager's (max absolute error over max absolute
eager value). The convolution is tested with both translations (``DeformConv`` and
``GridSample`` + ``MatMul``). onnx, onnxruntime and onnxscript come with the ``test``
extra: without them the tests skip, except in CI (env ``CI`` set), where they fail.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from conftest import make_conv_inputs, make_msda_inputs
from torch import Tensor, nn

import deformops
from deformops.nn import DeformAttn2d, DeformConv2d

_MISSING = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
if _MISSING:
    _MESSAGE = f"ONNX tests need {', '.join(_MISSING)} (pip install -e '.[test]')"
    if os.environ.get("CI"):
        pytest.fail(f"{_MESSAGE}; env CI is set: the ONNX export must be tested", pytrace=False)
    pytest.skip(_MESSAGE, allow_module_level=True)

import onnx  # noqa: E402
import onnxruntime  # noqa: E402

import deformops.onnx  # noqa: E402

TOLERANCE = 1e-4
CONV_TRANSLATIONS = ("DeformConv", "GridSample")


def _export(
    module: nn.Module, args: tuple[object, ...], conv: str = "DeformConv", dynamic_shapes=None
) -> onnx.ModelProto:
    program = torch.onnx.export(
        module.eval(),
        args,
        custom_translation_table=deformops.onnx.translation_table(conv),
        dynamic_shapes=dynamic_shapes,
        verbose=False,
    )
    return program.model_proto


def _op_types(model: onnx.ModelProto) -> set[str]:
    """The operator types of the graph, after checking that all are standard ONNX ones."""
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}, model.opset_import
    assert not model.functions, [f.name for f in model.functions]
    assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)
    onnx.checker.check_model(model, full_check=True)
    return {node.op_type for node in model.graph.node}


def _flat(args: Sequence[object]) -> list[Tensor]:
    """The graph inputs: tensors in order, lists flattened, None left out."""
    flat: list[Tensor] = []
    for item in args:
        if isinstance(item, (list, tuple)):
            flat.extend(_flat(item))
        elif item is not None:
            flat.append(item)
    return flat


def _assert_runs_like_eager(
    model: onnx.ModelProto, module: nn.Module, calls: Sequence[tuple[object, ...]]
) -> None:
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    names = [i.name for i in session.get_inputs()]
    for args in calls:
        with torch.no_grad():
            expected = module(*args)
        inputs = _flat(args)
        assert len(names) == len(inputs)
        (actual,) = session.run(None, {n: t.numpy() for n, t in zip(names, inputs, strict=True)})
        actual = torch.from_numpy(actual)
        assert actual.shape == expected.shape
        error = ((actual - expected).abs().max() / expected.abs().max()).item()
        assert error <= TOLERANCE, f"max relative error {error:.2e} at shapes {actual.shape}"


def _float32(arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v.float() if isinstance(v, Tensor) and v.is_floating_point() else v
        for k, v in arguments.items()
    }


class _Conv(nn.Module):
    """``deformops.deform_conv2d`` with every tensor a graph input (None where absent)."""

    def __init__(self, stride, padding, dilation) -> None:
        super().__init__()
        self.params = (stride, padding, dilation)

    def forward(self, input, offset, weight, mask, bias) -> Tensor:
        return deformops.deform_conv2d(input, offset, weight, bias, *self.params, mask=mask)


CONV_CASES = {  # make_conv_inputs arguments
    "plain": {},
    "v1-no-bias": {"mask": False, "bias": False, "offsets": "far"},
    "groups": {"groups": 2, "c_out": 6, "bias": False},
    "offset-groups": {"offset_groups": 2, "mask": False, "offsets": "integer"},
    "stride-dilation": {"h": 10, "w": 9, "stride": 2, "padding": 2, "dilation": 2},
    "rectangular": {
        "c_in": 8,
        "h": 9,
        "w": 8,
        "kh": 2,
        "kw": 3,
        "stride": (2, 1),
        "padding": (0, 2),
        "dilation": (1, 2),
        "groups": 2,
        "offset_groups": 4,
    },
}


def _conv_call(n: int, case: dict[str, Any]) -> tuple[object, ...]:
    a = _float32(make_conv_inputs(n=n, **case))
    return a["input"], a["offset"], a["weight"], a["mask"], a["bias"]


@pytest.mark.parametrize("conv", CONV_TRANSLATIONS)
@pytest.mark.parametrize("case", CONV_CASES)
def test_deform_conv2d_dynamic_batch(conv: str, case: str) -> None:
    arguments = CONV_CASES[case]
    a = make_conv_inputs(**arguments)
    module = _Conv(a["stride"], a["padding"], a["dilation"])
    trace = _conv_call(2, arguments)
    batch = torch.export.Dim("batch")
    shapes = [None if t is None else {0: batch} for t in trace]
    shapes[2] = shapes[4] = None  # weight and bias
    model = _export(module, trace, conv, tuple(shapes))
    op_types = _op_types(model)
    assert conv in op_types
    assert ({"DeformConv", "GridSample"} - {conv}).isdisjoint(op_types)
    _assert_runs_like_eager(model, module, [_conv_call(3, arguments), _conv_call(1, arguments)])


class _Attention(nn.Module):
    """``deformops.multi_scale_deformable_attention`` with every tensor a graph input."""

    def forward(self, value, spatial_shapes, level_start_index, locations, weights) -> Tensor:
        return deformops.multi_scale_deformable_attention(
            value, spatial_shapes, level_start_index, locations, weights
        )


MSDA_CASES = {  # make_msda_inputs arguments
    "three-levels": {},
    "one-level": {"levels": ((7, 5),), "m": 1, "d": 3, "p": 1},
    "four-levels-odd": {
        "levels": ((9, 11), (5, 6), (3, 3), (1, 2)),
        "m": 3,
        "d": 5,
        "q": 7,
        "p": 4,
    },
}


def _msda_call(n: int, q: int, case: dict[str, Any]) -> tuple[object, ...]:
    return tuple(_float32(make_msda_inputs(n=n, **{**case, "q": q})).values())


@pytest.mark.parametrize("case", MSDA_CASES)
def test_msda_dynamic_batch_and_queries(case: str) -> None:
    arguments = MSDA_CASES[case]
    batch, queries = torch.export.Dim("batch"), torch.export.Dim("queries")
    shapes = ({0: batch}, None, None, {0: batch, 1: queries}, {0: batch, 1: queries})
    model = _export(_Attention(), _msda_call(2, 6, arguments), dynamic_shapes=shapes)
    assert "GridSample" in _op_types(model)
    calls = [_msda_call(3, 4, arguments), _msda_call(1, 9, arguments)]
    _assert_runs_like_eager(model, _Attention(), calls)


def test_msda_level_shapes_read_at_run_time() -> None:
    """One graph, exported with a dynamic ``S``, serves other level sizes."""
    positions = torch.export.Dim("positions")
    shapes = ({1: positions}, None, None, None, None)
    model = _export(_Attention(), _msda_call(2, 6, {}), dynamic_shapes=shapes)
    other = _msda_call(2, 6, {"levels": ((9, 7), (5, 4), (2, 3))})
    _assert_runs_like_eager(model, _Attention(), [other])


def test_dynamic_heads_are_rejected() -> None:
    heads = torch.export.Dim("heads")
    shapes = ({2: heads}, None, None, {2: heads}, {2: heads})
    with pytest.raises(torch.onnx.OnnxExporterError, match="value: dimension 2 must be static"):
        _export(_Attention(), _msda_call(2, 6, {"m": 3}), dynamic_shapes=shapes)


def _randomize(module: nn.Module) -> nn.Module:
    """Non-zero offset predictors, so that the sampling points are fractional."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "offset" in name or "attention_weights" in name:
                parameter.normal_(0.0, 0.3)
    return module.eval()


def _attn_call(n: int) -> tuple[object, ...]:
    maps = [torch.randn(n, 16, h, w) for h, w in ((11, 9), (6, 5), (3, 3))]
    return torch.randn(n, 17, 16), torch.rand(n, 17, 3, 2) * 1.4 - 0.2, maps


MODULES = {  # module, inputs of a batch, translation of the convolution
    "DeformConv2d-DeformConv": (
        lambda: DeformConv2d(8, 12, (3, 2), stride=(1, 2), groups=2, offset_groups=2),
        lambda n: (torch.randn(n, 8, 10, 11),),
        "DeformConv",
    ),
    "DeformConv2d-GridSample": (
        lambda: DeformConv2d(8, 12, (3, 2), stride=(1, 2), groups=2, offset_groups=2),
        lambda n: (torch.randn(n, 8, 10, 11),),
        "GridSample",
    ),
    "DeformAttn2d": (lambda: DeformAttn2d(16, 4, 3, 3), _attn_call, "DeformConv"),
}


@pytest.mark.parametrize("dynamic", [False, True], ids=["fixed", "dynamic"])
@pytest.mark.parametrize("name", MODULES)
def test_modules(name: str, dynamic: bool) -> None:
    make_module, make_call, conv = MODULES[name]
    module = _randomize(make_module())
    trace = make_call(2)
    batch = torch.export.Dim("batch")
    shapes = None
    if dynamic:
        shapes = tuple([{0: batch}] * len(x) if isinstance(x, list) else {0: batch} for x in trace)
    model = _export(module, trace, conv, shapes)
    _op_types(model)
    _assert_runs_like_eager(model, module, [trace, make_call(4)] if dynamic else [trace])


def test_translation_table_rejects_unknown_conv() -> None:
    with pytest.raises(ValueError, match="conv: expected one of"):
        deformops.onnx.translation_table("Gather")


def test_missing_onnxscript_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript raises
    monkeypatch.delitem(sys.modules, "deformops.onnx")
    with pytest.raises(ImportError, match="pip install onnx onnxscript"):
        importlib.import_module("deformops.onnx")
