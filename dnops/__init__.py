"""dnops: custom PyTorch kernels for DN-DETR-style detectors.

Ops: ``ms_deform_attn`` (multi-scale deformable attention), ``dn_queries`` (denoising-query generation),
``dn_self_attention`` and ``dn_attn_mask`` (decoder self-attention under the DN mask). Each has a pure-PyTorch
reference in ``dnops.reference`` and C++/CUDA/Triton kernels where built; ``python -m dnops.info`` shows which.
"""

from dnops import _backend, compat, nn  # noqa: F401  (dnops.nn and dnops.compat reachable after `import dnops`)
from dnops._backend import use_backend
from dnops.compat import MSDeformAttnFunction, multi_scale_deformable_attn_pytorch
from dnops.ops import DNQueries, dn_attn_mask, dn_queries, dn_self_attention, ms_deform_attn

__version__ = "0.1.0"
HAS_C = _backend.HAS_C

__all__ = [
    "DNQueries",
    "HAS_C",
    "MSDeformAttnFunction",
    "multi_scale_deformable_attn_pytorch",
    "dn_attn_mask",
    "dn_queries",
    "dn_self_attention",
    "ms_deform_attn",
    "use_backend",
]
