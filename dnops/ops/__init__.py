"""Public dnops ops: each picks its backend per device (see dnops._backend) and checks its arguments."""

from dnops.ops.dn_attn_mask import dn_attn_mask
from dnops.ops.dn_queries import DNQueries, dn_queries
from dnops.ops.dn_self_attention import dn_self_attention
from dnops.ops.ms_deform_attn import ms_deform_attn

__all__ = ["DNQueries", "dn_attn_mask", "dn_queries", "dn_self_attention", "ms_deform_attn"]
