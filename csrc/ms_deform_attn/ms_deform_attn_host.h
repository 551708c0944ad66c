#pragma once
// Host-side argument checks of ms_deform_attn, shared by the CPU and CUDA entry points.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <c10/util/OptionalArrayRef.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <type_traits>

#include "ms_deform_attn/ms_deform_attn_common.h"

namespace dnops {
namespace msda {

// The sizes of a call. `samples` is the number of points of one (query, head) row (L * P, or sum_l P_l with a count
// per level); `layout` says which level each of them samples; `discrete`: nearest-pixel sampling.
struct Dims {
  int64_t batch, spatial, heads, channels, queries, levels, samples;
  PointLayout layout;
  bool discrete;
};

inline Dims check_args(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                       const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                       at::OptionalIntArrayRef points_per_level, bool discrete) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (N, S, M, D), got ", value.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be (L, 2), got ", spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1, "ms_deform_attn: level_start_index must be (L,), got ",
              level_start_index.sizes());
  const bool per_level = points_per_level.has_value();
  // with a count per level the point axis is one axis of sum_l P_l points
  const int64_t point_dims = per_level ? 4 : 5;
  TORCH_CHECK(sampling_locations.dim() == point_dims + 1 && sampling_locations.size(point_dims) == 2,
              "ms_deform_attn: sampling_locations must be ",
              per_level ? "(N, Lq, M, sum_l P_l, 2) with points_per_level" : "(N, Lq, M, L, P, 2)", ", got ",
              sampling_locations.sizes());
  TORCH_CHECK(attention_weights.dim() == point_dims, "ms_deform_attn: attention_weights must be ",
              per_level ? "(N, Lq, M, sum_l P_l) with points_per_level" : "(N, Lq, M, L, P)", ", got ",
              attention_weights.sizes());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64");
  // the geometry (locations and weights) in value's dtype, or in float32 with a float16 / bfloat16 value
  const at::ScalarType geometry = sampling_locations.scalar_type();
  const bool half = value.scalar_type() == at::kHalf || value.scalar_type() == at::kBFloat16;
  TORCH_CHECK(attention_weights.scalar_type() == geometry &&
                  (geometry == value.scalar_type() || (half && geometry == at::kFloat)),
              "ms_deform_attn: sampling_locations and attention_weights must have value's dtype ", value.scalar_type(),
              half ? " or float32" : "", ", got ", geometry, " and ", attention_weights.scalar_type());
  for (const at::Tensor* t : {&spatial_shapes, &level_start_index, &sampling_locations, &attention_weights}) {
    TORCH_CHECK(t->device() == value.device(), "ms_deform_attn: all inputs must be on value's device ", value.device(),
                ", got ", t->device());
  }
  Dims d{
      value.size(0), value.size(1), value.size(2), value.size(3), sampling_locations.size(1), spatial_shapes.size(0), 0,
      PointLayout{}, discrete};
  TORCH_CHECK(level_start_index.size(0) == d.levels, "ms_deform_attn: level_start_index has ",
              level_start_index.size(0), " levels but spatial_shapes has ", d.levels);
  if (per_level) {
    const at::IntArrayRef counts = *points_per_level;
    TORCH_CHECK(static_cast<int64_t>(counts.size()) == d.levels, "ms_deform_attn: points_per_level has ", counts.size(),
                " counts but spatial_shapes has ", d.levels, " levels");
    TORCH_CHECK(d.levels <= PointLayout::kMaxLevels, "ms_deform_attn: points_per_level takes at most ",
                PointLayout::kMaxLevels, " levels, got ", d.levels);
    int64_t total = 0;
    for (int64_t l = 0; l < d.levels; ++l) {
      TORCH_CHECK(counts[l] >= 1 && counts[l] <= std::numeric_limits<int32_t>::max() - total,
                  "ms_deform_attn: points_per_level must hold one count >= 1 per level, got ", counts);
      d.layout.start[l] = static_cast<int32_t>(total);
      total += counts[l];
    }
    d.layout.start[d.levels] = static_cast<int32_t>(total);
    d.samples = total;
    TORCH_CHECK(sampling_locations.size(0) == d.batch && sampling_locations.size(2) == d.heads &&
                    sampling_locations.size(3) == total,
                "ms_deform_attn: sampling_locations must be (N, Lq, M, sum_l P_l = ", total,
                ", 2) matching value and points_per_level ", counts, ", got ", sampling_locations.sizes());
  } else {
    const int64_t points = sampling_locations.size(4);
    TORCH_CHECK(points < std::numeric_limits<int32_t>::max() / std::max<int64_t>(d.levels, 1),
                "ms_deform_attn: a (query, head) row must have fewer than 2^31 points, got L * P = ", d.levels, " * ",
                points);
    d.layout.points = static_cast<int32_t>(points);
    d.samples = d.levels * points;
    TORCH_CHECK(sampling_locations.size(0) == d.batch && sampling_locations.size(2) == d.heads &&
                    sampling_locations.size(3) == d.levels && d.layout.points >= 1,
                "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2) matching value and spatial_shapes, "
                "got ",
                sampling_locations.sizes());
  }
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, point_dims),
              "ms_deform_attn: attention_weights must be ", sampling_locations.sizes().slice(0, point_dims), ", got ",
              attention_weights.sizes());
  return d;
}

// Output buffers of the backward: grad_value and the weights' gradient accumulate in the op-math type (float32
// for half types), the location gradient is written once per sample in the locations' type.
struct Grads {
  at::Tensor value, loc, weights;

  std::tuple<at::Tensor, at::Tensor, at::Tensor> finish(at::ScalarType value_dtype,
                                                        at::ScalarType weights_dtype) const {
    return {value.to(value_dtype), loc, weights.to(weights_dtype)};
  }
};

// `zero_geometry` false: the caller's kernel writes every element of the location and weight gradients, which
// then skip the zero fill (as large as grad_value's at enc800).
inline Grads backward_buffers(const at::Tensor& grad_output, const Dims& dm, const at::Tensor& value,
                              const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                              bool zero_geometry = true, bool zero_value = true) {
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({dm.batch, dm.queries, dm.heads * dm.channels}),
              "ms_deform_attn backward: grad_output must be (N, Lq, M*D), got ", grad_output.sizes());
  const auto acc = at::toOpMathType(value.scalar_type());
  auto geometry = [&](const at::Tensor& like, at::ScalarType dtype) {
    return zero_geometry ? at::zeros(like.sizes(), like.options().dtype(dtype))
                         : at::empty(like.sizes(), like.options().dtype(dtype));
  };
  return {zero_value ? at::zeros(value.sizes(), value.options().dtype(acc))
                     : at::empty(value.sizes(), value.options().dtype(acc)),
          geometry(sampling_locations, sampling_locations.scalar_type()), geometry(attention_weights, acc)};
}

// Calls f(value type tag, geometry type tag): the geometry in value's dtype, or float32 with a half value.
template <typename F>
void dispatch_types(const at::Tensor& value, const at::Tensor& loc, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn", [&] {
    if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
      if (loc.scalar_type() == at::kFloat) return f(scalar_t(), float());
    }
    return f(scalar_t(), scalar_t());
  });
}

}  // namespace msda
}  // namespace dnops
