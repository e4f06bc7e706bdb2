"""Run the multi-scale deformable attention of Hugging Face transformers on deformops.

Each DETR-family model of transformers carries its own copy of the operator in its
modeling module, in one of two forms, both replaced by :func:`patch`:

- a layer ``MultiScaleDeformableAttention`` whose ``forward(value, value_spatial_shapes,
  value_spatial_shapes_list, level_start_index, sampling_locations, attention_weights,
  im2col_step)`` runs the pure-PyTorch ``grid_sample`` formulation, and which
  ``kernels``' ``kernelize`` (``from_pretrained(..., use_kernels=True)``) would give a
  Hub CUDA kernel: its ``forward`` is replaced, and its ``kernel_layer_name`` (the mark
  ``kernelize`` looks for) hidden while patched, so that the layer stays on deformops
  (Deformable DETR, RT-DETR, Grounding DINO, MM Grounding DINO, OmDet-Turbo, LW-DETR,
  RF-DETR, PP-DocLayout);
- a function ``multi_scale_deformable_attention(value, value_spatial_shapes,
  sampling_locations, attention_weights)``, replaced in the module (Mask2Former,
  OneFormer).

Both take ``value`` ``[N, S, M, D]``, the level sizes as ``(H_l, W_l)`` pairs, normalised
``(x, y)`` ``sampling_locations`` ``[N, Q, M, L, P, 2]`` and ``attention_weights``
``[N, Q, M, L, P]``, and return ``[N, Q, M*D]``: the contract of
:func:`deformops.multi_scale_deformable_attention`. The level tables are built from the
Python list of level sizes (as transformers' own code uses them) and cached per sizes and
device, so the level check of deformops reads them from the device once.

Patch before calling the models; a layer already kernelized keeps its Hub kernel. This
module does not import transformers; :func:`patch` does.

Examples
--------
>>> from deformops.integrations import transformers as hf_integration
>>> hf_integration.is_patched()
False
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence
from types import ModuleType

import torch
from torch import Tensor, nn

from ..functional import multi_scale_deformable_attention
from ..nn.deform_attn import level_start_index_of
from ._patching import MISSING, Patch

__all__ = ["MODELS", "is_patched", "patch", "unpatch"]

MODELS = (
    "deformable_detr",
    "mask2former",
    "rt_detr",
    "grounding_dino",
    "mm_grounding_dino",
    "oneformer",
    "omdet_turbo",
    "lw_detr",
    "rf_detr",
    "pp_doclayout_v2",
    "pp_doclayout_v3",
    "pp_doclayout_v4",
)
"""The ``transformers.models`` packages whose attention :func:`patch` replaces, where the
installed transformers has them."""

_PATCH = Patch()
_patched_models: tuple[str, ...] = ()

LevelSizes = Sequence[tuple[int, int]] | Tensor


@functools.lru_cache(maxsize=64)
def _cached_tables(
    sizes: tuple[tuple[int, int], ...], device: torch.device
) -> tuple[Tensor, Tensor]:
    spatial_shapes = torch.tensor(sizes, dtype=torch.int64, device=device)
    return spatial_shapes, level_start_index_of(spatial_shapes)


def _level_tables(sizes: LevelSizes, device: torch.device) -> tuple[Tensor, Tensor]:
    """``spatial_shapes`` ``[L, 2]`` and ``level_start_index`` ``[L]`` on ``device``."""
    if isinstance(sizes, Tensor) or torch.compiler.is_compiling():  # traced: no cache
        spatial_shapes = torch.as_tensor(sizes, dtype=torch.int64, device=device)
        return spatial_shapes, level_start_index_of(spatial_shapes)
    return _cached_tables(tuple((int(h), int(w)) for h, w in sizes), device)


def _function(
    value: Tensor,
    value_spatial_shapes: LevelSizes,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """transformers' ``multi_scale_deformable_attention`` function, on deformops."""
    spatial_shapes, level_start_index = _level_tables(value_spatial_shapes, value.device)
    return multi_scale_deformable_attention(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


def _forward(
    self: nn.Module,
    value: Tensor,
    value_spatial_shapes: Tensor,
    value_spatial_shapes_list: Sequence[tuple[int, int]],
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    im2col_step: int,
) -> Tensor:
    """transformers' ``MultiScaleDeformableAttention.forward``, on deformops.

    ``value_spatial_shapes`` and ``level_start_index`` are the tensor forms of
    ``value_spatial_shapes_list``, from which the cached tables are taken; ``im2col_step``
    has no effect.
    """
    return _function(value, value_spatial_shapes_list, sampling_locations, attention_weights)


def _replacements(name: str, module: ModuleType) -> list[tuple[object, str, object]]:
    """The attribute changes of one modeling module; an error if it has no known hook."""
    layer = getattr(module, "MultiScaleDeformableAttention", None)
    function = getattr(module, "multi_scale_deformable_attention", None)
    changes: list[tuple[object, str, object]] = []
    if isinstance(layer, type) and issubclass(layer, nn.Module):
        changes += [(layer, "forward", _forward), (layer, "kernel_layer_name", MISSING)]
    if callable(function):
        changes.append((module, "multi_scale_deformable_attention", _function))
    if not changes:
        version = importlib.import_module("transformers").__version__
        raise RuntimeError(
            f"deformops.integrations.transformers.patch(): {module.__name__} (transformers "
            f"{version}) has neither a MultiScaleDeformableAttention layer nor a "
            f"multi_scale_deformable_attention function: this version's {name} is not supported"
        )
    return changes


def _modeling_module(name: str) -> ModuleType | None:
    """``transformers.models.<name>.modeling_<name>``, or None where this version lacks it."""
    module_name = f"transformers.models.{name}.modeling_{name}"
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and module_name.startswith(error.name):
            return None
        raise


def patch() -> tuple[str, ...]:
    """Make the multi-scale deformable attention of transformers run on deformops.

    Idempotent: a second call changes nothing.

    Returns
    -------
    tuple of str
        The entries of :data:`MODELS` that the installed transformers has, all patched.

    Raises
    ------
    ImportError
        When transformers is not installed.
    RuntimeError
        When a model of :data:`MODELS` exists but calls its attention in a way this
        module does not know (another transformers version); nothing is patched then.
    """
    global _patched_models
    if _PATCH.active:
        return _patched_models
    try:
        importlib.import_module("transformers")
    except ImportError as error:
        raise ImportError(
            "deformops.integrations.transformers.patch() needs transformers "
            f"(pip install transformers): {error}"
        ) from error
    modules = {name: _modeling_module(name) for name in MODELS}
    found = {name: module for name, module in modules.items() if module is not None}
    changes = [change for name, module in found.items() for change in _replacements(name, module)]
    _PATCH.apply(changes)
    _patched_models = tuple(found)
    return _patched_models


def unpatch() -> None:
    """Restore transformers' own attention; nothing happens when not patched."""
    global _patched_models
    _PATCH.undo()
    _patched_models = ()


def is_patched() -> bool:
    """Whether :func:`patch` is in effect."""
    return _PATCH.active
