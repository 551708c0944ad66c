"""Names other DETR code bases import, on dnops kernels: swap one import, or route a built model with
``dnops.compat.use_dnops(model)``; the compiled extensions codebases build under their own names:
``dnops.compat.provide(name)`` (dnops.compat.extensions).

dnops.compat.dn_detr (prepare_for_dn, dn_post_process) and dnops.compat.dino (prepare_for_cdn, dn_post_process)
keep their module names apart, as their originals do; each model family has its own ``use_dnops`` beside the front
door's (dnops.compat.ultralytics, .rfdetr, .transformers, .rtdetr).
"""

from dnops.compat import dino, dn_detr, rfdetr, rtdetr, transformers, ultralytics  # noqa: F401  (dnops.compat.<name>)
from dnops.compat._front import Routing, use_dnops
from dnops.compat.deformable_detr import MSDeformAttnFunction, ms_deform_attn_core_pytorch
from dnops.compat.extensions import provide
from dnops.compat.mmcv import multi_scale_deformable_attn_pytorch

__all__ = [
    "MSDeformAttnFunction",
    "Routing",
    "ms_deform_attn_core_pytorch",
    "multi_scale_deformable_attn_pytorch",
    "provide",
    "use_dnops",
]
