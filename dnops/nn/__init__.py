"""Drop-in modules: same names, parameters, state_dict keys and call signatures as the originals."""

from dnops.nn.dn_mha import DNMultiheadAttention
from dnops.nn.ms_deform_attn import MSDeformAttn

__all__ = ["DNMultiheadAttention", "MSDeformAttn"]
