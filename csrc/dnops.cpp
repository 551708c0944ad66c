// The one schema block of the dnops library, and the Python module that loads it.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/Generator.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <mutex>

#include "compat/dn_detr.h"

TORCH_LIBRARY(dnops, m) {
  m.def("dn_attn_mask(int pad_size, int group_size, int num_queries, *, Device? device=None) -> Tensor");
  m.def(
      "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, Tensor sampling_locations, "
      "Tensor attention_weights, bool attention_logits=False) -> Tensor");
  m.def(
      "_ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, bool attention_logits=False) -> (Tensor, Tensor, Tensor)");
  m.def(
      "dn_queries(Tensor labels, Tensor boxes, int[] counts, int num_groups, int max_gt, bool contrastive, "
      "int num_classes, float label_noise_ratio, float box_noise_scale, int seed) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "dn_self_attention(Tensor q, Tensor k, Tensor v, int pad_size, int group_size, float scale) -> (Tensor, Tensor)");
  m.def(
      "_dn_self_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "int pad_size, int group_size, float scale) -> (Tensor, Tensor, Tensor)");
}

namespace {

// Draws a 62-bit seed from torch's default CPU generator without dispatching an aten op, so seeding the
// denoising noise adds no kernel launch and no device sync; torch.manual_seed still reproduces it.
int64_t draw_seed() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return static_cast<int64_t>(gen.get<at::CPUGeneratorImpl>()->random64() >> 2);
}

bool built_with_cuda() {
#ifdef DNOPS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("draw_seed", &draw_seed, "A non-negative 62-bit seed from torch's default CPU generator.");
  m.def("built_with_cuda", &built_with_cuda, "Whether the CUDA kernels were compiled into this extension.");
  m.def("dn_detr_prepare", &dnops::dn_detr_prepare,
        "DN-DETR's prepare_for_dn (training) on the dnops ops, see dn_detr.h.");
}
