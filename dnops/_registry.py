"""What each dnops op is, written once.

Per op: the public name (``dnops.<name>``), the ``dnops::`` schemas csrc/dnops.cpp defines for it (the kernels'
entry points), the device kinds a full build compiles a kernel for, whether it has a Triton kernel
(dnops/triton/<name>.py) and an exact formulation as torch's scaled_dot_product_attention calls (dnops.reference),
and per device kind the order in which its default backend is picked. ``dnops._backend`` (the choice),
``python -m dnops.info``, the build and GPU tests and the GPU benchmark read this table: a new op or backend is an
entry here plus the op's own files.
"""

from __future__ import annotations

from dataclasses import dataclass

# reference: dnops.reference (always); cpu / cuda: the C++ / CUDA kernels compiled into dnops._C; triton:
# dnops.triton; sdpa: the SDPA formulation in dnops.reference.
BACKENDS = ("reference", "cpu", "cuda", "triton", "sdpa")
COMPILED = frozenset({"cpu", "cuda"})
# Earlier names, still accepted by DNOPS_BACKEND and dnops.use_backend: "cpp" was the compiled kernel of whichever
# device the tensors are on.
ALIASES = ("cpp",)


@dataclass(frozen=True)
class OpInfo:
    name: str
    schemas: tuple[str, ...]
    compiled: frozenset[str]  # "cpu" / "cuda": what a full build registers (the dispatcher says what this one has)
    triton: bool = False
    sdpa: bool = False
    # schemas among ``schemas`` whose one kernel is CompositeImplicitAutograd (dnops ops and aten ops called from
    # C++, for every device): an adapter's fused call, not a kernel per device
    composite: tuple[str, ...] = ()

    @property
    def kernels(self) -> tuple[str, ...]:
        """The schemas with a kernel per device kind."""
        return tuple(s for s in self.schemas if s not in self.composite)


OPS: dict[str, OpInfo] = {
    op.name: op
    for op in (
        OpInfo("ms_deform_attn", ("ms_deform_attn", "_ms_deform_attn_backward"), frozenset({"cpu", "cuda"}), True),
        OpInfo(
            "dn_queries",
            ("dn_queries", "_dn_detr_prepare"),
            frozenset({"cpu", "cuda"}),
            triton=True,
            composite=("_dn_detr_prepare",),
        ),
        OpInfo(
            "dn_self_attention",
            ("dn_self_attention", "_dn_self_attention_backward"),
            frozenset({"cpu"}),
            triton=True,
            sdpa=True,
        ),
        OpInfo("dn_attn_mask", ("dn_attn_mask",), frozenset({"cpu", "cuda"})),
    )
}

# The default on a device kind: the first of these that can run the op, else the reference. On a GPU, until a GPU
# run measures the Triton kernels, torch's own attention kernels (sdpa) come before a Triton kernel that only the
# interpreter and the sm_90 compile check have seen.
DEFAULT_ORDER: dict[str, tuple[str, ...]] = {"cpu": ("cpu",), "cuda": ("cuda", "sdpa", "triton")}
