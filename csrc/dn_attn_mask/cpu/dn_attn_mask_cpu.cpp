#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "dn_attn_mask/dn_attn_mask_common.h"

namespace dnops {
namespace {

at::Tensor dn_attn_mask_cpu(int64_t pad_size, int64_t group_size, int64_t num_queries,
                            std::optional<at::Device> device) {
  check_dn_structure(pad_size, group_size, num_queries);
  const int64_t width = pad_size + num_queries;
  at::Tensor out = at::empty({width, width}, at::TensorOptions().dtype(at::kBool).device(at::kCPU));
  bool* data = out.data_ptr<bool>();
  at::parallel_for(0, width, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      bool* out_row = data + row * width;
      for (int64_t col = 0; col < width; ++col) out_row[col] = dn_blocked(row, col, pad_size, group_size);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dnops, CPU, m) {
  m.impl("dn_attn_mask", &dn_attn_mask_cpu);
}

}  // namespace dnops
