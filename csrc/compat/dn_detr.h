#pragma once
// DN-DETR's prepare_for_dn as one host call, for dnops.compat.dn_detr (bound in dnops.cpp's Python module).
#include <ATen/core/Tensor.h>

#include <vector>

namespace dnops {

// The training branch of prepare_for_dn on the dnops ops, every step of it dispatched from C++: the adapter's
// cost is its dispatches and its Python between them, not arithmetic. Autograd records the aten ops as usual
// (label_weight and anchors get their gradients); any device whose dnops kernels are registered works.
//   labels[b] (n_b,) int, boxes[b] (n_b, 4): image b's targets; label_weight (>= num_classes + 1, E);
//   anchors (num_queries, 4); zero_row (1, E), indicator (num_classes + 2, 1), matching_index (M, B) int64:
//   constant inputs of the label lookup (M = num_queries * num_patterns, W = pad + M, K = sum n_b, G = groups).
// Returns input_query_label (W, B, E + 1), input_query_bbox (W, B, 4), attn_mask (W, W) bool, the index maps
// (2GK + 2K,) int64 = [known_indice (GK) | batch_idx (K) | map_known_indice (GK) | row within its image (K)],
// known labels (GK,) and known boxes (GK, 4).
std::vector<at::Tensor> dn_detr_prepare(const std::vector<at::Tensor>& labels, const std::vector<at::Tensor>& boxes,
                                        const at::Tensor& label_weight, const at::Tensor& anchors,
                                        const at::Tensor& zero_row, const at::Tensor& indicator,
                                        const at::Tensor& matching_index, int64_t num_patterns, int64_t num_classes,
                                        int64_t num_groups, double label_noise_ratio, double box_noise_scale,
                                        int64_t seed);

}  // namespace dnops
