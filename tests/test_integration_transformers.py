"""``deformops.integrations.transformers``: the models of Hugging Face transformers give
the same outputs and gradients before and after ``patch()``, and run on deformops after it.

Small randomly initialised configs (``transformers_models.TINY``, no downloads): tiny
``d_model``, one layer, 96x128 images. The CUDA speed-up of the patch is measured by
``tests/gpu/test_cuda_transformers.py``.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers_models as models
from conftest import count_calls
from torch import Tensor

from deformops.integrations import transformers as hf_integration

if os.environ.get("CI"):
    import transformers  # the test extra installs it: CI must run these tests
else:
    transformers = pytest.importorskip("transformers")

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}  # relative error (norm)


@pytest.fixture(autouse=True)
def _unpatched() -> Iterator[None]:
    hf_integration.unpatch()
    yield
    hf_integration.unpatch()


@pytest.fixture
def msda_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the calls of the deformops operator (one entry per call)."""
    return count_calls(monkeypatch, "multi_scale_deformable_attention")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", list(models.MODELS))
def test_model_same_outputs_and_gradients(
    name: str, dtype: torch.dtype, msda_calls: list[int]
) -> None:
    pixel_values = torch.randn(2, 3, 96, 128, dtype=dtype)
    model, extra = models.build(transformers, name, models.TINY, pixel_values)
    before = models.forward_backward(model, pixel_values, extra)
    assert not msda_calls, "the unpatched model called deformops"
    assert name in hf_integration.patch()
    after = models.forward_backward(model, pixel_values, extra)
    layers = models.attention_layers(name, models.TINY)
    assert len(msda_calls) == layers, f"deformops ran {len(msda_calls)} times, expected {layers}"
    output_error, grad_error, worst = models.largest_errors(before, after)
    assert output_error <= TOLERANCE[dtype]
    assert grad_error <= TOLERANCE[dtype], f"gradient of {worst}"


# --- every patched module, at the operator -------------------------------------------------


def _operator_inputs(dtype: torch.dtype) -> dict[str, Any]:
    levels = [(6, 8), (3, 4), (1, 2)]
    shapes = torch.tensor(levels)
    sizes = shapes.prod(1)
    generator = torch.Generator().manual_seed(4)

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator, dtype=dtype)

    return {
        "value": rand(2, int(sizes.sum()), 3, 5) - 0.5,
        "spatial_shapes": shapes,
        "spatial_shapes_list": levels,
        "level_start_index": torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]]),
        "sampling_locations": rand(2, 7, 3, 3, 4, 2) * 1.4 - 0.2,  # some points off the map
        "attention_weights": rand(2, 7, 3, 3, 4),
    }


def _call_operator(module: Any, inputs: dict[str, Any]) -> list[Tensor]:
    """The module's attention (its layer or its function) forward and backward."""
    leaves = {
        k: inputs[k].clone().requires_grad_()
        for k in ("value", "sampling_locations", "attention_weights")
    }
    value, loc, weights = leaves["value"], leaves["sampling_locations"], leaves["attention_weights"]
    if hasattr(module, "MultiScaleDeformableAttention"):
        out = module.MultiScaleDeformableAttention()(
            value,
            inputs["spatial_shapes"],
            inputs["spatial_shapes_list"],
            inputs["level_start_index"],
            loc,
            weights,
            64,
        )
    else:
        out = module.multi_scale_deformable_attention(
            value, inputs["spatial_shapes_list"], loc, weights
        )
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape))
    return [out.detach(), *(leaf.grad for leaf in leaves.values())]


@pytest.mark.parametrize("name", hf_integration.MODELS)
def test_every_patched_module_matches_at_the_operator(name: str, msda_calls: list[int]) -> None:
    module_name = f"transformers.models.{name}.modeling_{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    inputs = _operator_inputs(torch.float64)
    before = _call_operator(module, inputs)
    assert name in hf_integration.patch()
    after = _call_operator(module, inputs)
    assert len(msda_calls) == 1
    for which, a, b in zip(("output", "value", "locations", "weights"), after, before, strict=True):
        assert a.shape == b.shape, which
        assert models.relative_error(a, b) <= 1e-10, which


# --- patch mechanics ------------------------------------------------------------------------


def _hooks() -> dict[tuple[str, str], object]:
    """The own attributes that patch() replaces, by (module, attribute)."""
    found = {}
    for name in hf_integration.MODELS:
        module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        layer = getattr(module, "MultiScaleDeformableAttention", None)
        if layer is not None:
            found[(name, "forward")] = vars(layer)["forward"]
        if hasattr(module, "multi_scale_deformable_attention"):
            found[(name, "function")] = module.multi_scale_deformable_attention
    return found


def test_patch_is_idempotent_and_unpatch_restores_exactly() -> None:
    assert not hf_integration.is_patched()
    originals = _hooks()
    assert {"deformable_detr", "rt_detr", "grounding_dino", "mask2former"} <= {
        name for name, _ in originals
    }
    patched = hf_integration.patch()
    assert hf_integration.is_patched()
    replaced = _hooks()
    assert all(replaced[key] is not original for key, original in originals.items())
    assert hf_integration.patch() == patched
    assert _hooks() == replaced  # a second patch() changes nothing
    hf_integration.unpatch()
    assert not hf_integration.is_patched()
    restored = _hooks()
    assert all(restored[key] is original for key, original in originals.items())
    hf_integration.unpatch()  # a second unpatch() is harmless
    assert all(_hooks()[key] is original for key, original in originals.items())


def test_hub_kernel_mark_hidden_while_patched(monkeypatch: pytest.MonkeyPatch) -> None:
    """``kernels``' decorator marks the layer with ``kernel_layer_name``; ``kernelize``
    gives marked layers a Hub kernel. patch() hides the mark; unpatch() restores it."""
    from transformers.models.deformable_detr import modeling_deformable_detr as detr

    layer = detr.MultiScaleDeformableAttention
    monkeypatch.setattr(layer, "kernel_layer_name", "MultiScaleDeformableAttention", raising=False)
    hf_integration.patch()
    assert not hasattr(layer, "kernel_layer_name")
    hf_integration.unpatch()
    assert vars(layer)["kernel_layer_name"] == "MultiScaleDeformableAttention"


def test_missing_transformers_is_a_clear_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"needs transformers \(pip install transformers\)"):
        hf_integration.patch()
    assert not hf_integration.is_patched()


MIGRATING = Path(__file__).resolve().parents[1] / "docs" / "migrating.md"


def test_migrating_page_python_blocks_run() -> None:
    """The page's examples, except those that need torchvision, mmcv or mmdet."""
    text = MIGRATING.read_text(encoding="utf-8")
    blocks = re.findall(r"^```python[ \t]*\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
    runnable = [
        b for b in blocks if not re.search(r"^import (torchvision|mmdet)|^from mmengine", b, re.M)
    ]
    assert len(blocks) == 5
    assert len(runnable) == 3
    for index, block in enumerate(runnable):
        exec(compile(block, f"docs/migrating.md python block {index + 1}", "exec"), {})
