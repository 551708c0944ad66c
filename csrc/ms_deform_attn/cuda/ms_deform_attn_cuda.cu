// CUDA kernels of ms_deform_attn (compiled and registered on the development machine, which has no GPU; the
// per-sample math is ms_deform_attn_common.h, which the CPU kernel and its tests exercise).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "ms_deform_attn/ms_deform_attn.h"
#include "ms_deform_attn/ms_deform_attn_common.h"

namespace dnops {
namespace {

using msda::Corners;
using msda::Dims;

constexpr int kThreads = 256;

inline int64_t blocks_for(int64_t total) {
  return std::min<int64_t>((total + kThreads - 1) / kThreads, 1 << 20);
}

// One thread per output element (n, q, m, d): neighbouring threads read neighbouring channels of a corner, so
// the gathers coalesce; the corner math per thread is cheap next to the memory traffic.
template <typename scalar_t>
__global__ void forward_kernel(Dims dm, const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                               const scalar_t* loc, const scalar_t* weights, bool logits, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t lp = dm.levels * dm.points;
  const int64_t row_stride = dm.heads * dm.channels;
  const int64_t total = dm.batch * dm.queries * dm.heads * dm.channels;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t d = idx % dm.channels;
    const int64_t row = idx / dm.channels;
    const int64_t m = row % dm.heads;
    const int64_t n = row / (dm.heads * dm.queries);
    const scalar_t* loc_row = loc + row * lp * 2;
    const scalar_t* w_row = weights + row * lp;
    acc_t mx = 0, sum = 1;
    if (logits) msda::softmax_stats(w_row, lp, mx, sum);
    acc_t acc = 0;
    for (int64_t l = 0; l < dm.levels; ++l) {
      const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
      const scalar_t* level_value = value + ((n * dm.spatial + starts[l]) * dm.heads + m) * dm.channels + d;
      for (int64_t p = 0; p < dm.points; ++p) {
        const int64_t i = l * dm.points + p;
        Corners<acc_t> c;
        if (!msda::bilinear_corners(static_cast<acc_t>(loc_row[2 * i]), static_cast<acc_t>(loc_row[2 * i + 1]), height,
                                    width, c)) {
          continue;
        }
        const acc_t a = msda::row_weight(w_row, i, logits, mx, sum);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (c.valid[k]) acc += a * c.weight[k] * static_cast<acc_t>(level_value[c.offset[k] * row_stride]);
        }
      }
    }
    out[idx] = static_cast<scalar_t>(acc);
  }
}

// One thread per sample (n, q, m, l, p): it owns that sample's location and weight gradients and adds its
// share of grad_value (float32 / float64) atomically.
template <typename scalar_t>
__global__ void backward_kernel(Dims dm, const scalar_t* grad_out, const scalar_t* value, const int64_t* shapes,
                                const int64_t* starts, const scalar_t* loc, const scalar_t* weights, bool logits,
                                at::opmath_type<scalar_t>* grad_value, scalar_t* grad_loc,
                                at::opmath_type<scalar_t>* grad_w) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t lp = dm.levels * dm.points;
  const int64_t row_stride = dm.heads * dm.channels;
  const int64_t total = dm.batch * dm.queries * dm.heads * lp;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t i = idx % lp;
    const int64_t l = i / dm.points;
    const int64_t row = idx / lp;
    const int64_t m = row % dm.heads;
    const int64_t n = row / (dm.heads * dm.queries);
    const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
    const scalar_t* w_row = weights + row * lp;
    acc_t mx = 0, sum = 1;
    if (logits) msda::softmax_stats(w_row, lp, mx, sum);
    const acc_t a = msda::row_weight(w_row, i, logits, mx, sum);
    const int64_t level_offset = ((n * dm.spatial + starts[l]) * dm.heads + m) * dm.channels;
    const scalar_t* g = grad_out + row * dm.channels;
    acc_t ga = 0, gx = 0, gy = 0;
    Corners<acc_t> c;
    if (msda::bilinear_corners(static_cast<acc_t>(loc[idx * 2]), static_cast<acc_t>(loc[idx * 2 + 1]), height, width,
                               c)) {
      for (int k = 0; k < 4; ++k) {
        if (!c.valid[k]) continue;
        const int64_t at = level_offset + c.offset[k] * row_stride;
        acc_t gv = 0;
        for (int64_t d = 0; d < dm.channels; ++d) {
          const acc_t gd = static_cast<acc_t>(g[d]);
          gv += gd * static_cast<acc_t>(value[at + d]);
          atomicAdd(grad_value + at + d, a * c.weight[k] * gd);
        }
        ga += c.weight[k] * gv;
        gx += c.dwdx[k] * gv;
        gy += c.dwdy[k] * gv;
      }
    }
    grad_w[idx] = ga;
    grad_loc[idx * 2] = static_cast<scalar_t>(a * gx * static_cast<acc_t>(width));
    grad_loc[idx * 2 + 1] = static_cast<scalar_t>(a * gy * static_cast<acc_t>(height));
  }
}

template <typename scalar_t>
__global__ void softmax_backward_kernel(int64_t rows, int64_t lp, const scalar_t* logits,
                                        at::opmath_type<scalar_t>* grad_w) {
  for (int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; row < rows;
       row += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    msda::softmax_backward_inplace(logits + row * lp, lp, grad_w + row * lp);
  }
}

at::Tensor ms_deform_attn_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                               const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                               const at::Tensor& attention_weights, bool attention_logits) {
  const Dims dm = msda::check_args(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  c10::cuda::CUDAGuard guard(value.device());
  const at::Tensor shapes = spatial_shapes.contiguous(), starts = level_start_index.contiguous();
  const at::Tensor v = value.contiguous(), loc = sampling_locations.contiguous(), w = attention_weights.contiguous();
  at::Tensor out = at::empty({dm.batch, dm.queries, dm.heads * dm.channels}, value.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cuda", [&] {
    forward_kernel<scalar_t><<<blocks_for(out.numel()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        dm, v.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), loc.data_ptr<scalar_t>(),
        w.data_ptr<scalar_t>(), attention_logits, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    bool attention_logits) {
  const Dims dm = msda::check_args(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const msda::Grads grads = msda::backward_buffers(grad_output, dm, value, sampling_locations, attention_weights);
  c10::cuda::CUDAGuard guard(value.device());
  const at::Tensor shapes = spatial_shapes.contiguous(), starts = level_start_index.contiguous();
  const at::Tensor v = value.contiguous(), loc = sampling_locations.contiguous(), w = attention_weights.contiguous();
  const at::Tensor g = grad_output.contiguous().to(value.scalar_type());
  const at::Tensor &grad_value = grads.value, &grad_loc = grads.loc, &grad_w = grads.weights;
  const int64_t samples = attention_weights.numel();
  if (samples > 0 && value.numel() > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      backward_kernel<scalar_t><<<blocks_for(samples), kThreads, 0, stream>>>(
          dm, g.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
          loc.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), attention_logits, grad_value.data_ptr<acc_t>(),
          grad_loc.data_ptr<scalar_t>(), grad_w.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (attention_logits) {
        const int64_t rows = dm.batch * dm.queries * dm.heads;
        softmax_backward_kernel<scalar_t><<<blocks_for(rows), kThreads, 0, stream>>>(
            rows, dm.levels * dm.points, w.data_ptr<scalar_t>(), grad_w.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  return grads.finish(value.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(dnops, CUDA, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cuda);
  m.impl("_ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

}  // namespace dnops
