"""Transcriptions of the code dnops' drop-ins replace: the published DN-DETR, DINO, detrex and MaskDINO denoising
algorithms and the real-time DETRs' deformable-attention functions and denoising groups, re-written device-agnostic.
The oracle of the dnops.compat adapter tests and the baseline of the benchmarks; not part of the dnops package.

One module per upstream project, each with the upstream's copyright and licence notice (all Apache-2.0) and the
commit it was read against line by line (docs/testing.md, "Transcriptions"); each function names its file.
"""

from originals.deim import deim_deformable_attention_core_func_v2
from originals.detrex import (
    DetrexGenerateDNQueries,
    detrex_apply_box_noise,
    detrex_apply_label_noise,
    detrex_dn_post_process,
    detrex_prepare_for_cdn,
    detrex_set_aux_loss,
)
from originals.dfine import dfine_get_contrastive_denoising_training_group
from originals.dino import dino_prepare_for_cdn
from originals.dn_detr import (
    dn_deformable_detr_prepare_for_dn,
    dn_detr_group_mask,
    dn_detr_prepare_for_dn,
    dn_dino_deformable_detr_prepare_for_dn,
    dn_dino_deformable_detr_prepare_for_loss,
)
from originals.maskdino import maskdino_dn_post_process, maskdino_prepare_for_dn, maskdino_set_aux_loss
from originals.rtdetr import (
    rtdetr_deformable_attention_core_func,
    rtdetr_get_contrastive_denoising_training_group,
    ultralytics_83_multi_scale_deformable_attn_pytorch,
)

__all__ = [
    "DetrexGenerateDNQueries",
    "deim_deformable_attention_core_func_v2",
    "detrex_apply_box_noise",
    "detrex_apply_label_noise",
    "detrex_dn_post_process",
    "detrex_prepare_for_cdn",
    "detrex_set_aux_loss",
    "dfine_get_contrastive_denoising_training_group",
    "dino_prepare_for_cdn",
    "dn_deformable_detr_prepare_for_dn",
    "dn_detr_group_mask",
    "dn_detr_prepare_for_dn",
    "dn_dino_deformable_detr_prepare_for_dn",
    "dn_dino_deformable_detr_prepare_for_loss",
    "maskdino_dn_post_process",
    "maskdino_prepare_for_dn",
    "maskdino_set_aux_loss",
    "rtdetr_deformable_attention_core_func",
    "rtdetr_get_contrastive_denoising_training_group",
    "ultralytics_83_multi_scale_deformable_attn_pytorch",
]
