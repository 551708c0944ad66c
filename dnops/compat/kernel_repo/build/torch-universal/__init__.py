"""dnops as a local kernel repository of the `kernels` package (a universal build: it imports the installed dnops):
the layers transformers routes through ``use_kernel_forward_from_hub`` (dnops.compat.transformers.kernel_mapping)."""

from dnops.compat.transformers import MultiScaleDeformableAttention


class layers:  # noqa: N801  (the attribute name kernelize looks the layers up in)
    MultiScaleDeformableAttention = MultiScaleDeformableAttention
