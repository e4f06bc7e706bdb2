"""Drop-in integrations with the libraries that ship deformable operators.

- :mod:`deformops.integrations.torchvision`: ``patch()`` makes
  ``torchvision.ops.deform_conv2d`` and ``torchvision.ops.DeformConv2d`` run on deformops.
- :mod:`deformops.integrations.transformers`: ``patch()`` makes the multi-scale deformable
  attention of Hugging Face transformers' Deformable DETR, Mask2Former, RT-DETR, Grounding
  DINO (and the other models that share their operator) run on deformops.
- :mod:`deformops.integrations.mmcv`: layers with the constructors, forward signatures and
  state dicts of mmcv's ``ModulatedDeformConv2dPack``, ``DeformConv2dPack`` and
  ``MultiScaleDeformableAttention``.

Importing ``deformops`` or any of these submodules imports neither torchvision nor
transformers nor mmcv: ``patch()`` imports its library when called.

Examples
--------
>>> import deformops.integrations
>>> deformops.integrations.transformers.is_patched()
False
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["mmcv", "torchvision", "transformers"]


def __getattr__(name: str) -> ModuleType:
    """Import a submodule on first access (``deformops.integrations.torchvision`` etc.)."""
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
