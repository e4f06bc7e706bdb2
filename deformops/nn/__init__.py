"""Modules built on the deformops operators."""

from .deform_attn import DeformAttn2d
from .deform_conv import DeformConv2d

__all__ = ["DeformAttn2d", "DeformConv2d"]
