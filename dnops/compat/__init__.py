"""Names other DETR code bases import, on dnops kernels: swap one import."""

from dnops.compat.deformable_detr import MSDeformAttnFunction, ms_deform_attn_core_pytorch
from dnops.compat.mmcv import multi_scale_deformable_attn_pytorch

__all__ = ["MSDeformAttnFunction", "ms_deform_attn_core_pytorch", "multi_scale_deformable_attn_pytorch"]
