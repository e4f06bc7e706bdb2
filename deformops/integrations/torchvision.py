"""Run ``torchvision.ops.deform_conv2d`` and ``torchvision.ops.DeformConv2d`` on deformops.

:func:`patch` replaces three attributes of torchvision:

- ``torchvision.ops.deform_conv2d`` and ``torchvision.ops.deform_conv.deform_conv2d`` by
  :func:`deformops.deform_conv2d` (same arguments, layouts and results);
- ``torchvision.ops.DeformConv2d.forward`` by a forward that calls
  :func:`deformops.deform_conv2d` with the layer's ``weight``, ``bias``, ``stride``,
  ``padding`` and ``dilation``, so existing layers and their state dicts are unchanged.

:func:`unpatch` puts the originals back. Names bound before :func:`patch` (``from
torchvision.ops import deform_conv2d`` at the top of a module) keep torchvision's function:
call :func:`patch` first, or use ``torchvision.ops.deform_conv2d`` through the module.
TorchScript-compiled torchvision layers are not affected.

This module does not import torchvision; :func:`patch` does.

Examples
--------
>>> from deformops.integrations import torchvision as tv_integration
>>> tv_integration.is_patched()
False
"""

from __future__ import annotations

import importlib
from types import ModuleType

from torch import Tensor, nn

from ..functional import deform_conv2d
from ._patching import Patch

__all__ = ["is_patched", "patch", "unpatch"]

_PATCH = Patch()


def _import_deform_conv() -> ModuleType:
    """``torchvision.ops.deform_conv``, or an ImportError that says what to do."""
    try:
        return importlib.import_module("torchvision.ops.deform_conv")
    except (ImportError, RuntimeError) as error:
        raise ImportError(
            "deformops.integrations.torchvision.patch() needs torchvision, which could not "
            f"be imported ({type(error).__name__}: {error}); install a torchvision built for "
            "this torch (pip install torchvision), or call deformops.deform_conv2d directly"
        ) from error


def _deform_conv2d_forward(
    self: nn.Module, input: Tensor, offset: Tensor, mask: Tensor | None = None
) -> Tensor:
    """``torchvision.ops.DeformConv2d.forward`` on :func:`deformops.deform_conv2d`."""
    return deform_conv2d(
        input, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask
    )


def patch() -> None:
    """Make torchvision's deformable convolution run on deformops.

    Idempotent: a second call changes nothing.

    Raises
    ------
    ImportError
        When torchvision is missing or fails to import.
    """
    if _PATCH.active:
        return
    deform_conv = _import_deform_conv()
    ops = importlib.import_module("torchvision.ops")
    _PATCH.apply(
        [
            (ops, "deform_conv2d", deform_conv2d),
            (deform_conv, "deform_conv2d", deform_conv2d),
            (deform_conv.DeformConv2d, "forward", _deform_conv2d_forward),
        ]
    )


def unpatch() -> None:
    """Restore torchvision's own functions; nothing happens when not patched."""
    _PATCH.undo()


def is_patched() -> bool:
    """Whether :func:`patch` is in effect."""
    return _PATCH.active
