#pragma once
// Host-side argument checks of ms_deform_attn, shared by the CPU and CUDA entry points.
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <tuple>

namespace dnops {
namespace msda {

struct Dims {
  int64_t batch, spatial, heads, channels, queries, levels, points;
};

inline Dims check_args(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                       const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (N, S, M, D), got ", value.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be (L, 2), got ", spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1, "ms_deform_attn: level_start_index must be (L,), got ",
              level_start_index.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got ", sampling_locations.sizes());
  TORCH_CHECK(attention_weights.dim() == 5, "ms_deform_attn: attention_weights must be (N, Lq, M, L, P), got ",
              attention_weights.sizes());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64");
  TORCH_CHECK(
      sampling_locations.scalar_type() == value.scalar_type() && attention_weights.scalar_type() == value.scalar_type(),
      "ms_deform_attn: sampling_locations and attention_weights must have value's dtype ", value.scalar_type());
  for (const at::Tensor* t : {&spatial_shapes, &level_start_index, &sampling_locations, &attention_weights}) {
    TORCH_CHECK(t->device() == value.device(), "ms_deform_attn: all inputs must be on value's device ", value.device(),
                ", got ", t->device());
  }
  const Dims d{value.size(0),
               value.size(1),
               value.size(2),
               value.size(3),
               sampling_locations.size(1),
               spatial_shapes.size(0),
               sampling_locations.size(4)};
  TORCH_CHECK(level_start_index.size(0) == d.levels, "ms_deform_attn: level_start_index has ",
              level_start_index.size(0), " levels but spatial_shapes has ", d.levels);
  TORCH_CHECK(sampling_locations.size(0) == d.batch && sampling_locations.size(2) == d.heads &&
                  sampling_locations.size(3) == d.levels && d.points >= 1,
              "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2) matching value and spatial_shapes, got ",
              sampling_locations.sizes());
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
              "ms_deform_attn: attention_weights must be ", sampling_locations.sizes().slice(0, 5), ", got ",
              attention_weights.sizes());
  return d;
}

// Output buffers of the backward: grad_value and the weights' gradient accumulate in the op-math type (float32
// for half types), the location gradient is written once per sample in the input type.
struct Grads {
  at::Tensor value, loc, weights;

  std::tuple<at::Tensor, at::Tensor, at::Tensor> finish(at::ScalarType dtype) const {
    return {value.to(dtype), loc, weights.to(dtype)};
  }
};

inline Grads backward_buffers(const at::Tensor& grad_output, const Dims& dm, const at::Tensor& value,
                              const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({dm.batch, dm.queries, dm.heads * dm.channels}),
              "ms_deform_attn backward: grad_output must be (N, Lq, M*D), got ", grad_output.sizes());
  const auto acc = at::toOpMathType(value.scalar_type());
  return {at::zeros(value.sizes(), value.options().dtype(acc)),
          at::zeros(sampling_locations.sizes(), sampling_locations.options()),
          at::zeros(attention_weights.sizes(), attention_weights.options().dtype(acc))};
}

}  // namespace msda
}  // namespace dnops
