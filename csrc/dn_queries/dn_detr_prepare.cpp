// DN-DETR's prepare_for_dn (training branch) as one op, for dnops.compat.dn_detr: every step of it dispatched from
// C++, since the adapter's cost is its dispatches and the Python between them, not arithmetic. A
// CompositeImplicitAutograd kernel: autograd records the aten ops it calls (label_weight and anchors get their
// gradients), and any device whose dnops kernels are registered runs it.
//   labels[b] (n_b,) int, boxes[b] (n_b, 4): image b's targets; label_weight (>= num_classes + 1, E);
//   anchors (num_queries, 4); zero_row (1, E), indicator (num_classes + 2, 1), matching_index (M, B) int64:
//   constant inputs of the label lookup (M = num_queries * num_patterns, W = pad + M, K = sum n_b, G = groups).
// Returns input_query_label (W, B, E + 1), input_query_bbox (W, B, 4), attn_mask (W, W) bool, the index maps
// (2GK + 2K,) int64 = [known_indice (GK) | batch_idx (K) | map_known_indice (GK) | row within its image (K)],
// known labels (GK,) and known boxes (GK, 4).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace dnops {
namespace {

// DN-DETR's inverse_sigmoid eps.
constexpr double kEps = 1e-3;

// The host-side index maps of mask_dict, built in one buffer so they cost one copy to the device.
at::Tensor index_maps(const std::vector<int64_t>& counts, int64_t known, int64_t groups, int64_t group_size,
                      const at::Device& device) {
  at::Tensor maps = at::empty({2 * groups * known + 2 * known}, at::kLong);
  int64_t* known_indice = maps.data_ptr<int64_t>();
  int64_t* batch_idx = known_indice + groups * known;
  int64_t* map_known_indice = batch_idx + known;
  int64_t* within = map_known_indice + groups * known;
  for (int64_t b = 0, k = 0; b < static_cast<int64_t>(counts.size()); ++b) {
    for (int64_t j = 0; j < counts[b]; ++j, ++k) {
      batch_idx[k] = b;
      within[k] = j;
    }
  }
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t k = 0; k < known; ++k) {
      known_indice[g * known + k] = k;
      map_known_indice[g * known + k] = within[k] + g * group_size;
    }
  }
  if (!device.is_cuda()) return maps.to(device);
  // From pinned memory the copy is asynchronous: no sync (a copy from pageable memory waits for the stream).
  return maps.pin_memory().to(device, /*non_blocking=*/true);
}

std::vector<at::Tensor> dn_detr_prepare(at::TensorList labels, at::TensorList boxes, const at::Tensor& label_weight,
                                        const at::Tensor& anchors, const at::Tensor& zero_row,
                                        const at::Tensor& indicator, const at::Tensor& matching_index,
                                        int64_t num_patterns, int64_t num_classes, int64_t num_groups,
                                        double label_noise_ratio, double box_noise_scale, int64_t seed) {
  static auto dn_queries_op = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("dnops::dn_queries", "")
                                  .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                                      const at::Tensor&, const at::Tensor&, at::IntArrayRef, int64_t, int64_t, bool,
                                      int64_t, double, double, int64_t, bool)>();
  static auto dn_attn_mask_op = c10::Dispatcher::singleton()
                                    .findSchemaOrThrow("dnops::dn_attn_mask", "")
                                    .typed<at::Tensor(int64_t, int64_t, int64_t, std::optional<at::Device>)>();
  const int64_t batch = static_cast<int64_t>(labels.size());
  TORCH_CHECK_VALUE(batch > 0 && boxes.size() == labels.size(),
                    "prepare_for_dn: need one labels and one boxes tensor per image, got ", labels.size(), " and ",
                    boxes.size());
  TORCH_CHECK_VALUE(matching_index.dim() == 2 && matching_index.size(1) == batch, "prepare_for_dn: batch_size is ",
                    matching_index.size(1), " but there are ", batch, " targets");
  TORCH_CHECK_VALUE(label_weight.size(0) > num_classes,
                    "prepare_for_dn: label_enc needs num_classes + 1 = ", num_classes + 1, " rows, has ",
                    label_weight.size(0));
  std::vector<int64_t> counts(batch);
  int64_t known = 0;
  for (int64_t b = 0; b < batch; ++b) {
    counts[b] = labels[b].size(0);
    known += counts[b];
  }
  const int64_t max_gt = *std::max_element(counts.begin(), counts.end());
  const at::Tensor gt_labels = at::cat(labels).to(at::kLong), gt_boxes = at::cat(boxes);
  auto [dn_labels, dn_boxes, gt_index, negative] =
      dn_queries_op.call(gt_labels, gt_boxes, counts, num_groups, max_gt, false, num_classes, label_noise_ratio,
                         box_noise_scale, seed, false);

  // One lookup writes the whole sequence-first query tensor (the step's largest write): rows 0..C-1 are the class
  // embeddings with indicator 1, row C the zero padding slot, row C+1 the matching queries' embedding.
  const at::Tensor weight = label_weight.to(anchors.scalar_type());
  const at::Tensor table =
      at::cat({at::cat({weight.narrow(0, 0, num_classes), zero_row, weight.narrow(0, num_classes, 1)}), indicator}, 1);
  at::Tensor input_query_label = at::embedding(table, at::cat({dn_labels.t(), matching_index}));

  // inverse_sigmoid in place on the op's fresh boxes, which it has already clamped to [0, 1].
  const at::Tensor far = at::rsub(dn_boxes, 1.0).clamp_min_(kEps);
  const at::Tensor box_queries = dn_boxes.clamp_min_(kEps).div_(far).log_().to(anchors.scalar_type());
  const int64_t matching = matching_index.size(0);
  const at::Tensor refpoint = anchors.expand({num_patterns, -1, -1}).reshape({matching, -1}).expand({batch, -1, -1});
  at::Tensor input_query_bbox = at::cat({box_queries, refpoint}, 1).transpose(0, 1);

  at::Tensor attn_mask = dn_attn_mask_op.call(num_groups * max_gt, max_gt, matching, anchors.device());
  return {input_query_label,
          input_query_bbox,
          attn_mask,
          index_maps(counts, known, num_groups, max_gt, anchors.device()),
          gt_labels.repeat({num_groups}),
          gt_boxes.repeat({num_groups, 1})};
}

}  // namespace

TORCH_LIBRARY_IMPL(dnops, CompositeImplicitAutograd, m) {
  m.impl("_dn_detr_prepare", &dn_detr_prepare);
}

}  // namespace dnops
