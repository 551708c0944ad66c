// The one schema block of the dnops library, and the Python module that loads it.
#include <torch/extension.h>
#include <torch/library.h>

#include "dn_queries/dn_queries_host.h"

TORCH_LIBRARY(dnops, m) {
  m.def("dn_attn_mask(SymInt pad_size, SymInt group_size, SymInt num_queries, *, Device? device=None) -> Tensor");
  // points_per_level: a point count per level, the locations then (N, Lq, M, sum_l P_l, 2); discrete: nearest pixel
  m.def(
      "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, Tensor sampling_locations, "
      "Tensor attention_weights, bool attention_logits=False, int[]? points_per_level=None, bool discrete=False) -> "
      "Tensor");
  m.def(
      "_ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, bool attention_logits=False, int[]? points_per_level=None, "
      "bool discrete=False) -> (Tensor, Tensor, Tensor)");
  // seed -1 draws the key from torch's default CPU generator inside the op, so a compiled graph draws a fresh
  // one per call (a seed drawn in Python while tracing would become a constant)
  m.def(
      "dn_queries(Tensor labels, Tensor boxes, SymInt[] counts, SymInt num_groups, SymInt max_gt, bool contrastive, "
      "int num_classes, float label_noise_ratio, float box_noise_scale, int seed, bool abs_size=False) -> (Tensor, "
      "Tensor, Tensor, Tensor)",
      {at::Tag::nondeterministic_seeded});
  // DN-DETR's prepare_for_dn training branch in one call (dnops.compat.dn_detr), seed as dn_queries'
  m.def(
      "_dn_detr_prepare(Tensor[] labels, Tensor[] boxes, Tensor label_weight, Tensor anchors, Tensor zero_row, "
      "Tensor indicator, Tensor matching_index, int num_patterns, int num_classes, int num_groups, "
      "float label_noise_ratio, float box_noise_scale, int seed) -> Tensor[]",
      {at::Tag::nondeterministic_seeded});
  m.def(
      "dn_self_attention(Tensor q, Tensor k, Tensor v, SymInt pad_size, SymInt group_size, float scale) -> (Tensor, "
      "Tensor)");
  m.def(
      "_dn_self_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "SymInt pad_size, SymInt group_size, float scale) -> (Tensor, Tensor, Tensor)");
}

namespace {

bool built_with_cuda() {
#ifdef DNOPS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("draw_seed", &dnops::dnq::draw_seed, "A non-negative 62-bit seed from torch's default CPU generator.");
  m.def("built_with_cuda", &built_with_cuda, "Whether the CUDA kernels were compiled into this extension.");
}
