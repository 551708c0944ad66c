#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "dn_structure_common.h"

namespace dnops {
namespace {

at::Tensor dn_attn_mask_cpu(int64_t pad_size, int64_t group_size, int64_t num_queries,
                            std::optional<at::Device> device) {
  check_dn_structure(pad_size, group_size, num_queries);
  const int64_t width = pad_size + num_queries;
  at::Tensor out = at::empty({width, width}, at::TensorOptions().dtype(at::kBool).device(at::kCPU));
  bool* data = out.data_ptr<bool>();
  // A row is three runs: the DN part blocked except its own group's span, then the visible matching part.
  at::parallel_for(0, width, 256, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      bool* out_row = data + row * width;
      int64_t lo, hi;
      dn_group_span(row, pad_size, group_size, lo, hi);
      std::fill(out_row, out_row + pad_size, true);
      std::fill(out_row + lo, out_row + hi, false);
      std::fill(out_row + pad_size, out_row + width, false);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dnops, CPU, m) {
  m.impl("dn_attn_mask", &dn_attn_mask_cpu);
}

}  // namespace dnops
