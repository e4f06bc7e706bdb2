"""The eager path (native forward operator with its C++ autograd node) against the
custom operators (what compile, export, modes and subclasses see): the same results and
gradients, bit for bit, on every device; and which path each kind of call takes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import DEVICES, deterministic_algorithms, make_conv_inputs, make_msda_inputs
from test_deform_roi_pool import make_roi_inputs
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import deformops

# (public function, its floating arguments, random float64 keyword arguments)
CASES: dict[str, tuple[Callable[..., torch.Tensor], tuple[str, ...], Callable[[], dict]]] = {
    "conv": (
        deformops.deform_conv2d,
        ("input", "offset", "weight", "mask", "bias"),
        lambda: make_conv_inputs(groups=2, offset_groups=2),
    ),
    "conv_no_mask_no_bias": (
        deformops.deform_conv2d,
        ("input", "offset", "weight"),
        lambda: make_conv_inputs(mask=False, bias=False),
    ),
    "msda": (
        deformops.multi_scale_deformable_attention,
        ("value", "sampling_locations", "attention_weights"),
        make_msda_inputs,
    ),
    "roi": (deformops.deform_roi_pool, ("input", "offset"), make_roi_inputs),
    "roi_no_offset": (
        deformops.deform_roi_pool,
        ("input",),
        lambda: make_roi_inputs(offsets=None),
    ),
}


class _PassThroughFunctionMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _PassThroughDispatchMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _run(name: str, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, list, str]:
    """Output, gradients and the output's grad_fn name of case ``name``."""
    fn, floats, make = CASES[name]
    torch.manual_seed(0)
    args = {
        k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
        if isinstance(v, torch.Tensor)
        else v
        for k, v in make().items()
    }
    leaves = [args[k].requires_grad_() for k in floats]
    out = fn(**args)
    grads = torch.autograd.grad(out, leaves, torch.randn_like(out))
    return out, list(grads), out.grad_fn.name()


@pytest.fixture
def native() -> Any:
    deformops.set_backend("native")
    try:
        yield
    finally:
        deformops.set_backend(None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(CASES))
def test_eager_path_equals_custom_op(native: None, name: str, device: str, dtype) -> None:
    # The CUDA backward's sums run in a fixed order only in deterministic mode, which
    # the RoI pooling's CUDA backward (atomic adds) does not have: it is compared to
    # rounding.
    exact = device == "cpu" or not name.startswith("roi")
    with deterministic_algorithms(device == "cuda" and exact):
        out, grads, node = _run(name, device, dtype)
        with _PassThroughFunctionMode():
            ref_out, ref_grads, ref_node = _run(name, device, dtype)
    assert "CppNode" in node, node
    assert "CppNode" not in ref_node, ref_node
    assert "deformops" in ref_node, ref_node
    assert torch.equal(out, ref_out)
    for g, ref in zip(grads, ref_grads, strict=True):
        assert g.dtype == ref.dtype
        if exact:
            assert torch.equal(g, ref)
        else:
            torch.testing.assert_close(g, ref)


def test_modes_and_subclasses_take_the_custom_op(native: None) -> None:
    with _PassThroughDispatchMode():
        assert "CppNode" not in _run("conv", "cpu", torch.float64)[2]

    class Sub(torch.Tensor):
        pass

    args = CASES["msda"][2]()
    args["value"] = args["value"].as_subclass(Sub).requires_grad_()
    out = deformops.multi_scale_deformable_attention(**args)
    assert "CppNode" not in out.grad_fn.name()


def test_reference_backend_takes_no_native_op() -> None:
    deformops.set_backend("reference")
    try:
        out = _run("conv", "cpu", torch.float64)[0]
    finally:
        deformops.set_backend(None)
    assert "CppNode" not in out.grad_fn.name()


def test_eager_path_checks_saved_tensors(native: None) -> None:
    fn, floats, make = CASES["conv"]
    args = make()
    leaves = [args[k].requires_grad_() for k in floats]
    out = fn(**args)
    with torch.no_grad():
        args["offset"].add_(1.0)  # modified after the forward saved it
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(out.sum(), leaves)


def test_eager_path_under_no_grad_and_inference_mode(native: None) -> None:
    fn, _, make = CASES["msda"]
    args = make()
    expected = fn(**args)
    with torch.no_grad():
        assert torch.equal(fn(**args), expected)
    with torch.inference_mode():
        assert torch.equal(fn(**args), expected)


@pytest.mark.parametrize("name", ["conv", "msda"])
def test_eager_path_under_activation_checkpointing(native: None, name: str) -> None:
    """torch.utils.checkpoint (non-reentrant: saved-tensor hooks, recomputation) gives the
    gradients of the plain call, bit for bit."""
    fn, floats, make = CASES[name]
    args = make()
    grad_output = None
    results = []
    for checkpointed in (False, True):
        call = {
            k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()
        }
        leaves = [call[k].requires_grad_() for k in floats]
        if checkpointed:
            out = torch.utils.checkpoint.checkpoint(lambda c=call: fn(**c), use_reentrant=False)
        else:
            out = fn(**call)
        assert "CppNode" in out.grad_fn.name()
        grad_output = torch.randn_like(out) if grad_output is None else grad_output
        results.append(torch.autograd.grad(out, leaves, grad_output))
    for plain, checkpointed in zip(*results, strict=True):
        assert torch.equal(plain, checkpointed)
