"""Names other DETR code bases import, on dnops kernels: swap one import.

dnops.compat.dn_detr (prepare_for_dn, dn_post_process) and dnops.compat.dino (prepare_for_cdn, dn_post_process)
keep their module names apart, as their originals do.
"""

from dnops.compat import dino, dn_detr, rtdetr  # noqa: F401  (dnops.compat.dn_detr / .dino / .rtdetr after `import dnops`)
from dnops.compat.deformable_detr import MSDeformAttnFunction, ms_deform_attn_core_pytorch
from dnops.compat.mmcv import multi_scale_deformable_attn_pytorch

__all__ = ["MSDeformAttnFunction", "ms_deform_attn_core_pytorch", "multi_scale_deformable_attn_pytorch"]
