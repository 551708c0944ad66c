"""Pure-PyTorch definitions of every dnops op: the oracle each kernel is tested against, and the fallback."""

from dnops.reference.dn_attn_mask import dn_attn_mask
from dnops.reference.dn_queries import dn_layout, dn_queries
from dnops.reference.dn_self_attention import dn_self_attention, dn_self_attention_dense, dn_self_attention_sdpa
from dnops.reference.ms_deform_attn import ms_deform_attn, ms_deform_attn_gather, ms_deform_attn_points

__all__ = [
    "dn_attn_mask",
    "dn_layout",
    "dn_queries",
    "dn_self_attention",
    "dn_self_attention_dense",
    "dn_self_attention_sdpa",
    "ms_deform_attn",
    "ms_deform_attn_gather",
    "ms_deform_attn_points",
]
