#pragma once
// Host-side argument checks and layout of dn_queries, shared by the CPU and CUDA entry points.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <mutex>

#include "dn_queries/dn_queries_common.h"

namespace dnops {
namespace dnq {

// A non-negative 62-bit key from torch's default CPU generator, drawn without dispatching an aten op (no kernel
// launch, no device sync); torch.manual_seed reproduces it.
inline int64_t draw_seed() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return static_cast<int64_t>(gen.get<at::CPUGeneratorImpl>()->random64() >> 2);
}

inline Layout check_and_layout(const at::Tensor& labels, const at::Tensor& boxes, at::IntArrayRef counts,
                               int64_t num_groups, int64_t max_gt, bool contrastive, int64_t num_classes,
                               double label_noise_ratio, double box_noise_scale, int64_t seed, bool abs_size) {
  TORCH_CHECK(labels.dim() == 1 && labels.scalar_type() == at::kLong, "dn_queries: labels must be (K,) int64, got ",
              labels.scalar_type(), " ", labels.sizes());
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4 && at::isFloatingType(boxes.scalar_type()),
              "dn_queries: boxes must be a floating (K, 4) tensor, got ", boxes.scalar_type(), " ", boxes.sizes());
  TORCH_CHECK(boxes.size(0) == labels.size(0), "dn_queries: labels and boxes must have one row per GT");
  TORCH_CHECK(boxes.device() == labels.device(), "dn_queries: labels and boxes must be on one device");
  int64_t total = 0;
  for (const int64_t c : counts) {
    TORCH_CHECK(c >= 0, "dn_queries: counts must be >= 0");
    total += c;
  }
  TORCH_CHECK(total == labels.size(0), "dn_queries: counts sum to ", total, " but there are ", labels.size(0),
              " GT rows");
  TORCH_CHECK(num_groups >= 1 && max_gt >= 0, "dn_queries: need num_groups >= 1 and max_gt >= 0");
  TORCH_CHECK(num_classes >= 1, "dn_queries: num_classes must be >= 1");
  TORCH_CHECK(seed >= -1, "dn_queries: seed must be >= 0, or -1 to draw one");
  if (seed == -1) seed = draw_seed();
  const int64_t group_size = max_gt * (contrastive ? 2 : 1);
  return {num_groups * group_size,
          group_size,
          max_gt,
          contrastive,
          num_classes,
          static_cast<float>(label_noise_ratio),
          static_cast<float>(box_noise_scale),
          static_cast<uint64_t>(seed),
          abs_size};
}

}  // namespace dnq
}  // namespace dnops
