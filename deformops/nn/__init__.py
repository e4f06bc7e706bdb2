"""Modules built on the deformops operators."""

from .deform_attn import DeformAttn2d
from .deform_conv import DeformConv2d
from .deform_roi_pool import DeformRoIPool2d, DeformRoIPoolPack2d, ModulatedDeformRoIPoolPack2d

__all__ = [
    "DeformAttn2d",
    "DeformConv2d",
    "DeformRoIPool2d",
    "DeformRoIPoolPack2d",
    "ModulatedDeformRoIPoolPack2d",
]
