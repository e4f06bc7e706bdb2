"""deformops: deformable sampling operators for PyTorch.

Deformable convolution (DCN v1/v2), deformable RoI pooling and multi-scale deformable
attention (Deformable DETR), drop-in compatible with ``torchvision.ops.deform_conv2d``,
mmcv's ``deform_roi_pool`` and Deformable DETR's operator, with native kernels compiled
on first use.

Examples
--------
>>> import torch, deformops
>>> layer = deformops.nn.DeformConv2d(16)
>>> layer(torch.randn(4, 16, 32, 64)).shape
torch.Size([4, 16, 32, 64])
"""

from . import integrations, nn, reference
from ._version import __version__
from .functional import deform_conv2d, deform_roi_pool, multi_scale_deformable_attention
from .ops import backend, set_backend

__all__ = [
    "__version__",
    "backend",
    "deform_conv2d",
    "deform_roi_pool",
    "integrations",
    "multi_scale_deformable_attention",
    "nn",
    "reference",
    "set_backend",
]
