// CUDA kernel of dn_queries (the per-slot math is dn_queries_common.h, which the CPU kernel and its tests
// exercise). Labels are not range-checked and boxes not checked for finiteness on the device (that would need a
// sync); the CPU kernel and the Python checks of the other backends do it.
//
// What bounds it: a few kB in and out (B=32, 5 groups of 30 slots: 4,800 slots x ~60 bytes, under 0.1 us of HBM
// time) and a few Philox rounds per slot, so one launch (a few us) is the cost; the counts travel as kernel
// parameters, so nothing is copied to the device first. Measured in the CUDA emulator's coalescing model (B = 32):
// the output rows are whole sectors (a box row: 16 sectors per 32-lane request).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "dn_queries/dn_queries_host.h"

namespace dnops {
namespace {

// (start, count) of every image, passed by value as kernel parameters: nothing is copied to the device first, so
// the call is free of host-to-device transfers and a CUDA graph captures it whole. Batches up to kSmallBatch take
// a 1 KB parameter block; larger ones up to kMaxBatch the ~32 KB CUDA 12.1+ allows for a launch's parameters.
constexpr int64_t kSmallBatch = 64;
constexpr int64_t kMaxBatch = 2000;

template <int64_t kCapacity>
struct Images {
  int64_t starts_counts[2 * kCapacity];

  __device__ int64_t start(int64_t b) const { return starts_counts[2 * b]; }
  __device__ int64_t count(int64_t b) const { return starts_counts[2 * b + 1]; }
};

template <typename scalar_t, typename images_t>
__global__ void dn_queries_kernel(dnq::Layout lay, int64_t batch, images_t images, const int64_t* gt_labels,
                                  const scalar_t* gt_boxes, int64_t* out_labels, scalar_t* out_boxes, int64_t* gt_index,
                                  bool* negative) {
  const int64_t total = batch * lay.pad;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t b = i / lay.pad;
    const dnq::Slot slot = dnq::make_slot(lay, i % lay.pad, images.start(b), images.count(b), gt_labels, gt_boxes);
    out_labels[i] = slot.label;
    for (int c = 0; c < 4; ++c) out_boxes[4 * i + c] = static_cast<scalar_t>(slot.box[c]);
    gt_index[i] = slot.gt_index;
    negative[i] = slot.negative;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dn_queries_cuda(
    const at::Tensor& labels_in, const at::Tensor& boxes_in, at::IntArrayRef counts, int64_t num_groups, int64_t max_gt,
    bool contrastive, int64_t num_classes, double label_noise_ratio, double box_noise_scale, int64_t seed,
    bool abs_size) {
  const dnq::Layout lay = dnq::check_and_layout(labels_in, boxes_in, counts, num_groups, max_gt, contrastive,
                                                num_classes, label_noise_ratio, box_noise_scale, seed, abs_size);
  c10::cuda::CUDAGuard guard(labels_in.device());
  const at::Tensor labels = labels_in.contiguous(), boxes = boxes_in.contiguous();
  const int64_t batch = static_cast<int64_t>(counts.size());
  at::Tensor out_labels = at::empty({batch, lay.pad}, labels.options());
  at::Tensor out_boxes = at::empty({batch, lay.pad, 4}, boxes.options());
  at::Tensor gt_index = at::empty({batch, lay.pad}, labels.options());
  at::Tensor negative = at::empty({batch, lay.pad}, labels.options().dtype(at::kBool));
  if (batch * lay.pad == 0) return {out_labels, out_boxes, gt_index, negative};
  TORCH_CHECK(batch <= kMaxBatch, "dn_queries: the CUDA kernel takes at most ", kMaxBatch, " images per call, got ",
              batch);
  constexpr int threads = 256;
  const int64_t blocks = std::min<int64_t>((batch * lay.pad + threads - 1) / threads, 65535);
  const auto launch = [&](auto images) {
    for (int64_t b = 0, acc = 0; b < batch; acc += counts[b], ++b) {
      images.starts_counts[2 * b] = acc;
      images.starts_counts[2 * b + 1] = counts[b];
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "dn_queries_cuda", [&] {
      dn_queries_kernel<scalar_t, decltype(images)><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          lay, batch, images, labels.data_ptr<int64_t>(), boxes.data_ptr<scalar_t>(), out_labels.data_ptr<int64_t>(),
          out_boxes.data_ptr<scalar_t>(), gt_index.data_ptr<int64_t>(), negative.data_ptr<bool>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  };
  if (batch <= kSmallBatch) {
    launch(Images<kSmallBatch>{});
  } else {
    launch(Images<kMaxBatch>{});
  }
  return {out_labels, out_boxes, gt_index, negative};
}

}  // namespace

TORCH_LIBRARY_IMPL(dnops, CUDA, m) {
  m.impl("dn_queries", &dn_queries_cuda);
}

}  // namespace dnops
