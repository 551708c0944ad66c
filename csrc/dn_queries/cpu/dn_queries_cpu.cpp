#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "dn_queries/dn_queries_host.h"

namespace dnops {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dn_queries_cpu(
    const at::Tensor& labels_in, const at::Tensor& boxes_in, at::IntArrayRef counts, int64_t num_groups, int64_t max_gt,
    bool contrastive, int64_t num_classes, double label_noise_ratio, double box_noise_scale, int64_t seed,
    bool abs_size) {
  const dnq::Layout lay = dnq::check_and_layout(labels_in, boxes_in, counts, num_groups, max_gt, contrastive,
                                                num_classes, label_noise_ratio, box_noise_scale, seed, abs_size);
  const at::Tensor labels = labels_in.contiguous(), boxes = boxes_in.contiguous();
  const int64_t* gt_labels = labels.data_ptr<int64_t>();
  // Value errors (Python ValueError), as the Python-side checks of the other backends raise for the same inputs.
  for (int64_t k = 0; k < labels.size(0); ++k) {
    TORCH_CHECK_VALUE(gt_labels[k] >= 0 && gt_labels[k] < num_classes,
                      "dnops.dn_queries: labels must be in [0, num_classes=", num_classes, "), got ", gt_labels[k]);
  }
  const int64_t batch = static_cast<int64_t>(counts.size());
  std::vector<int64_t> starts(batch);
  for (int64_t b = 0, acc = 0; b < batch; acc += counts[b], ++b) starts[b] = acc;
  at::Tensor out_labels = at::empty({batch, lay.pad}, labels.options());
  at::Tensor out_boxes = at::empty({batch, lay.pad, 4}, boxes.options());
  at::Tensor gt_index = at::empty({batch, lay.pad}, labels.options());
  at::Tensor negative = at::empty({batch, lay.pad}, labels.options().dtype(at::kBool));
  if (batch * lay.pad == 0) return {out_labels, out_boxes, gt_index, negative};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "dn_queries_cpu", [&] {
    const scalar_t* gt_boxes = boxes.data_ptr<scalar_t>();
    for (int64_t e = 0; e < boxes.numel(); ++e) {
      TORCH_CHECK_VALUE(std::isfinite(static_cast<double>(gt_boxes[e])),
                        "dnops.dn_queries: boxes must be finite, got NaN or infinite values");
    }
    int64_t* ol = out_labels.data_ptr<int64_t>();
    scalar_t* ob = out_boxes.data_ptr<scalar_t>();
    int64_t* oi = gt_index.data_ptr<int64_t>();
    bool* on = negative.data_ptr<bool>();
    at::parallel_for(0, batch * lay.pad, 256, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / lay.pad;
        const dnq::Slot slot = dnq::make_slot(lay, i % lay.pad, starts[b], counts[b], gt_labels, gt_boxes);
        ol[i] = slot.label;
        for (int c = 0; c < 4; ++c) ob[4 * i + c] = static_cast<scalar_t>(slot.box[c]);
        oi[i] = slot.gt_index;
        on[i] = slot.negative;
      }
    });
  });
  return {out_labels, out_boxes, gt_index, negative};
}

}  // namespace

TORCH_LIBRARY_IMPL(dnops, CPU, m) {
  m.impl("dn_queries", &dn_queries_cpu);
}

}  // namespace dnops
