// CUDA kernels of ms_deform_attn. The per-sample math (bilinear origin, corners, weights and their derivatives,
// softmax probabilities) is ms_deform_attn_common.h, which the CPU kernel and its tests exercise.
//
// Work mapping. One group of `tpr` consecutive lanes (a power of two <= 32) owns one (n, q, m) row; each lane
// holds VEC consecutive channels and moves them with one 16-byte (or narrower) load, so a corner's D channels
// come in one coalesced request. The lanes share the sampling geometry: lane t computes the corners of sample
// base + t of the row once, and the group reads it from that lane by shuffles, instead of every channel
// recomputing it. With logits, the row's softmax statistics are one group reduction. The backward reduces the
// location and weight gradients of a sample across the group by shuffles; grad_value is accumulated in float32
// (float64 for double) with vector atomics (sm_90 red.v4.f32), or, under torch.use_deterministic_algorithms,
// through a sort of the corner contributions by destination and an ordered gather (bitwise reproducible).
//
// What bounds it at enc800 (N=1, S=Lq=22,223, M=8, D=32, L=P=4; 2.84 M samples, 11.4 M corners), on an H200:
//   forward, float32: HBM traffic value 22.8 MB + locations 22.8 + weights 11.4 + output 22.8 = 80 MB, 19 us at
//     4.3 TB/s; 0.73 GFLOP of corner FMAs, 11 us at 67 TFLOP/s. value fits in L2 (60 MB), so the gathers are L2 /
//     L1 traffic: 11.4 M corners x 128 B = 1.46 GB, ~150 us at an assumed ~10 TB/s of L2 bandwidth. The L2
//     gather, not HBM, is the practical bound; bfloat16 halves it.
//   backward, float32: HBM traffic ~160 MB (the forward's inputs, grad_output, the three gradients), 37 us;
//     364 M float atomic adds into grad_value, issued as 91 M 16-byte reductions, plus the same 1.46 GB of
//     gathers: the atomics are expected to bound it.
// Sectors per request, measured in the CUDA emulator's coalescing model (docs/testing.md) on enc800 float32: a
// corner gather 15.3 (designed 16: 4 rows x 8 lanes x 16 bytes; idle lanes are rows whose corner is outside the
// map), its float4 atomic 15.3, an output row 16; all sectors fully used, so the gather bytes above are the
// traffic.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "ms_deform_attn/ms_deform_attn_common.h"
#include "ms_deform_attn/ms_deform_attn_host.h"

namespace dnops {
namespace {

using msda::Dims;

constexpr int kThreads = 256;
constexpr int64_t kNoCorner = std::numeric_limits<int64_t>::max();  // contribution key of a corner outside the map

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

// The lanes of one row's group: `lane` in [0, tpr), `mask` the group's bits in the warp (shuffles name only them,
// since groups past the last row leave early).
struct Group {
  int tpr, lane;
  unsigned mask;

  __device__ explicit Group(int tpr_) : tpr(tpr_), lane(threadIdx.x & (tpr_ - 1)) {
    const int first = (threadIdx.x & 31) & ~(tpr_ - 1);
    mask = tpr_ == 32 ? 0xffffffffu : (((1u << tpr_) - 1u) << first);
  }

  template <typename T>
  __device__ __forceinline__ T from(T x, int src) const {
    return __shfl_sync(mask, x, src, tpr);
  }

  template <typename T>
  __device__ __forceinline__ T sum(T x) const {
    for (int off = tpr >> 1; off > 0; off >>= 1) x += __shfl_xor_sync(mask, x, off, tpr);
    return x;
  }

  template <typename T>
  __device__ __forceinline__ T max(T x) const {
    for (int off = tpr >> 1; off > 0; off >>= 1) {
      const T y = __shfl_xor_sync(mask, x, off, tpr);
      x = y > x ? y : x;
    }
    return x;
  }
};

// One sample's geometry, as the group shares it: fractions, attention weight, the spatial index of corner 0
// (start of the level + y0 * W + x0, negative for a corner left of / above the map), the level's width and one
// bit per corner inside the map (0: the sample reads nothing).
template <typename acc_t>
struct Geo {
  acc_t lx, ly, a;
  int32_t pos0, width, inside;
};

template <typename acc_t>
__device__ __forceinline__ Geo<acc_t> share(const Group& g, const Geo<acc_t>& x, int src) {
  return {g.from(x.lx, src),   g.from(x.ly, src),    g.from(x.a, src),
          g.from(x.pos0, src), g.from(x.width, src), g.from(x.inside, src)};
}

// The row's softmax statistics over its lp logits, lanes striding over them.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void row_softmax_stats(const Group& g, const scalar_t* w_row, int lp, acc_t& mx,
                                                  acc_t& sum) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int i = g.lane; i < lp; i += g.tpr) m = fmax(m, static_cast<acc_t>(w_row[i]));
  mx = g.max(m);
  acc_t s = 0;
  for (int i = g.lane; i < lp; i += g.tpr) s += exp(static_cast<acc_t>(w_row[i]) - mx);
  sum = g.sum(s);
}

// What every kernel of a row needs first: where its locations and weights are, its image and head, and with
// logits the softmax statistics of its weights.
// geo_t: the locations' and weights' type (value's, or float32 with a half value); acc_t value's op-math type.
template <typename geo_t, typename acc_t>
struct Row {
  int64_t n, m;
  int lp;
  const geo_t* loc;
  const geo_t* weights;
  acc_t mx = 0, sum = 1;

  __device__ Row(const Group& g, const Dims& dm, int64_t row, const geo_t* loc_all, const geo_t* weights_all,
                 bool logits)
      : n(row / (dm.heads * dm.queries)),
        m(row % dm.heads),
        lp(static_cast<int>(dm.samples)),
        loc(loc_all + row * lp * 2),
        weights(weights_all + row * lp) {
    if (logits) row_softmax_stats(g, weights, lp, mx, sum);
  }
};

template <typename geo_t, typename acc_t>
__device__ __forceinline__ Geo<acc_t> sample_geo(const Dims& dm, int i, const Row<geo_t, acc_t>& r,
                                                 const int64_t* shapes, const int64_t* starts, bool logits,
                                                 int32_t& height) {
  const int l = dm.layout.level_of(i, static_cast<int>(dm.levels));
  const int64_t h = shapes[2 * l], w = shapes[2 * l + 1];
  Geo<acc_t> s{0, 0, msda::row_weight(r.weights, i, logits, r.mx, r.sum), 0, static_cast<int32_t>(w), 0};
  height = static_cast<int32_t>(h);
  const int64_t start = starts[l];
  if (!msda::level_fits(h, w, start, dm.spatial)) return s;
  if (dm.discrete) {
    // corner 0 at fractions (0, 0) has bilinear weight 1: the pixel itself
    const int64_t x = msda::nearest_pixel(static_cast<acc_t>(r.loc[2 * i]), w);
    const int64_t y = msda::nearest_pixel(static_cast<acc_t>(r.loc[2 * i + 1]), h);
    s.pos0 = static_cast<int32_t>(start + y * w + x);
    s.inside = 1;
    return s;
  }
  int64_t x0, y0;
  if (msda::bilinear_origin(static_cast<acc_t>(r.loc[2 * i]), static_cast<acc_t>(r.loc[2 * i + 1]), h, w, x0, y0, s.lx,
                            s.ly)) {
    s.pos0 = static_cast<int32_t>(start + msda::corner_offset<int64_t>(0, x0, y0, w));
#pragma unroll
    for (int k = 0; k < 4; ++k) s.inside |= msda::corner_inside<int64_t>(k, x0, y0, h, w) << k;
  }
  return s;
}

// Spatial index of corner k of a shared sample.
template <typename acc_t>
__device__ __forceinline__ int64_t corner_pos(const Geo<acc_t>& s, int k) {
  return s.pos0 + msda::corner_offset<int64_t>(k, 0, 0, s.width);
}

// 16- and 8-byte float reductions exist from sm_90 on; older archs add one float at a time.
template <int VEC>
__device__ __forceinline__ void atomic_add_pack(float* dst, const float (&x)[VEC]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int j = 0; j < VEC; j += 4) {
      atomicAdd(reinterpret_cast<float4*>(dst + j), make_float4(x[j], x[j + 1], x[j + 2], x[j + 3]));
    }
  } else if constexpr (VEC % 2 == 0) {
#pragma unroll
    for (int j = 0; j < VEC; j += 2) atomicAdd(reinterpret_cast<float2*>(dst + j), make_float2(x[j], x[j + 1]));
  } else {
    atomicAdd(dst, x[0]);
  }
#else
#pragma unroll
  for (int j = 0; j < VEC; ++j) atomicAdd(dst + j, x[j]);
#endif
}

template <int VEC>
__device__ __forceinline__ void atomic_add_pack(double* dst, const double (&x)[VEC]) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) atomicAdd(dst + j, x[j]);
}

template <typename scalar_t, typename geo_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(Dims dm, int tpr, const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                   const geo_t* loc, const geo_t* weights, bool logits, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const Group g(tpr);
  const int64_t row = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / tpr;
  if (row >= dm.batch * dm.queries * dm.heads) return;
  const Row<geo_t, acc_t> r(g, dm, row, loc, weights, logits);
  const int lp = r.lp;
  const int64_t pos_stride = dm.heads * dm.channels;
  const scalar_t* head_value = value + (r.n * dm.spatial * dm.heads + r.m) * dm.channels;
  for (int64_t c0 = 0; c0 < dm.channels; c0 += static_cast<int64_t>(tpr) * VEC) {
    const int64_t c = c0 + g.lane * VEC;
    const bool active = c < dm.channels;
    acc_t acc[VEC] = {};
    for (int base = 0; base < lp; base += tpr) {
      Geo<acc_t> mine{};
      int32_t height;
      if (base + g.lane < lp) mine = sample_geo(dm, base + g.lane, r, shapes, starts, logits, height);
      const int count = min(tpr, lp - base);
      for (int t = 0; t < count; ++t) {
        const Geo<acc_t> s = share(g, mine, t);
        if (!s.inside || !active) continue;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (!(s.inside >> k & 1)) continue;
          acc_t cw, dwdx, dwdy;
          msda::corner_weight(k, s.lx, s.ly, cw, dwdx, dwdy);
          const Pack<scalar_t, VEC> v = load_pack<scalar_t, VEC>(head_value + corner_pos(s, k) * pos_stride + c);
          const acc_t wk = s.a * cw;
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc[j] += wk * static_cast<acc_t>(v.v[j]);
        }
      }
    }
    if (active) {
      Pack<scalar_t, VEC> o;
#pragma unroll
      for (int j = 0; j < VEC; ++j) o.v[j] = static_cast<scalar_t>(acc[j]);
      *reinterpret_cast<Pack<scalar_t, VEC>*>(out + row * dm.channels + c) = o;
    }
  }
}

// With kDeterministic, grad_value is not touched: each sample's four corners are written to (keys, corner_w) as
// (destination row (n * S + pos) * M + m or kNoCorner, bilinear x attention weight), for gather_grad_value_kernel.
template <typename scalar_t, typename geo_t, int VEC, bool kDeterministic>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(Dims dm, int tpr, const scalar_t* grad_out, const scalar_t* value, const int64_t* shapes,
                    const int64_t* starts, const geo_t* loc, const geo_t* weights, bool logits,
                    at::opmath_type<scalar_t>* grad_value, geo_t* grad_loc, at::opmath_type<scalar_t>* grad_w,
                    int64_t* keys, at::opmath_type<scalar_t>* corner_w) {
  using acc_t = at::opmath_type<scalar_t>;
  const Group g(tpr);
  const int64_t row = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / tpr;
  if (row >= dm.batch * dm.queries * dm.heads) return;
  const Row<geo_t, acc_t> r(g, dm, row, loc, weights, logits);
  const int lp = r.lp;
  const int64_t n = r.n, m = r.m;
  const acc_t mx = r.mx, sum = r.sum;
  const geo_t* w_row = r.weights;
  const int64_t pos_stride = dm.heads * dm.channels;
  const int64_t head_offset = (n * dm.spatial * dm.heads + m) * dm.channels;
  const scalar_t* g_row = grad_out + row * dm.channels;
  for (int base = 0; base < lp; base += tpr) {
    const int i = base + g.lane;
    Geo<acc_t> mine{};
    int32_t height = 0;
    if (i < lp) mine = sample_geo(dm, i, r, shapes, starts, logits, height);
    acc_t my_ga = 0, my_gx = 0, my_gy = 0;
    const int count = min(tpr, lp - base);
    for (int t = 0; t < count; ++t) {
      const Geo<acc_t> s = share(g, mine, t);
      acc_t ga = 0, gx = 0, gy = 0;
      if (s.inside) {
        for (int64_t c = g.lane * VEC; c < dm.channels; c += static_cast<int64_t>(tpr) * VEC) {
          const Pack<scalar_t, VEC> gp = load_pack<scalar_t, VEC>(g_row + c);
          acc_t gc[VEC];
#pragma unroll
          for (int j = 0; j < VEC; ++j) gc[j] = static_cast<acc_t>(gp.v[j]);
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            if (!(s.inside >> k & 1)) continue;
            acc_t cw, dwdx, dwdy;
            msda::corner_weight(k, s.lx, s.ly, cw, dwdx, dwdy);
            const int64_t at = head_offset + corner_pos(s, k) * pos_stride + c;
            const Pack<scalar_t, VEC> v = load_pack<scalar_t, VEC>(value + at);
            acc_t gv = 0;
#pragma unroll
            for (int j = 0; j < VEC; ++j) gv += gc[j] * static_cast<acc_t>(v.v[j]);
            ga += cw * gv;
            gx += dwdx * gv;
            gy += dwdy * gv;
            if constexpr (!kDeterministic) {
              const acc_t wk = s.a * cw;
              acc_t add[VEC];
#pragma unroll
              for (int j = 0; j < VEC; ++j) add[j] = wk * gc[j];
              atomic_add_pack<VEC>(grad_value + at, add);
            }
          }
        }
      }
      ga = g.sum(ga);
      gx = g.sum(gx);
      gy = g.sum(gy);
      if (g.lane == t) my_ga = ga, my_gx = gx, my_gy = gy;
    }
    if (i < lp) {
      const int64_t idx = row * lp + i;
      grad_w[idx] = my_ga;
      // discrete sampling gives the locations no gradient (their buffer stays zero)
      if (!dm.discrete) {
        grad_loc[2 * idx] = static_cast<geo_t>(mine.a * my_gx * static_cast<acc_t>(mine.width));
        grad_loc[2 * idx + 1] = static_cast<geo_t>(mine.a * my_gy * static_cast<acc_t>(height));
      }
      if constexpr (kDeterministic) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          acc_t cw, dwdx, dwdy;
          msda::corner_weight(k, mine.lx, mine.ly, cw, dwdx, dwdy);
          const bool in = mine.inside >> k & 1;
          keys[4 * idx + k] = in ? (n * dm.spatial + corner_pos(mine, k)) * dm.heads + m : kNoCorner;
          corner_w[4 * idx + k] = mine.a * cw;
        }
      }
    }
  }
  if (logits) {
    // g_logit = p * (g_p - sum(p * g_p)); each lane reads back the entries it wrote above.
    acc_t dot = 0;
    for (int i = g.lane; i < lp; i += tpr) dot += msda::softmax_prob(w_row[i], mx, sum) * grad_w[row * lp + i];
    dot = g.sum(dot);
    for (int i = g.lane; i < lp; i += tpr) {
      acc_t& gw = grad_w[row * lp + i];
      gw = msda::softmax_prob(w_row[i], mx, sum) * (gw - dot);
    }
  }
}

// grad_value row r = (n * S + s) * M + m, channels of this lane: the sum over the corners sorted into
// [bounds[r], bounds[r + 1]) of corner_w * grad_output of the corner's row, in sorted (deterministic) order.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    gather_grad_value_kernel(int64_t value_rows, int64_t channels, int tpr, int64_t corners_per_row,
                             const int64_t* bounds, const int64_t* order, const at::opmath_type<scalar_t>* corner_w,
                             const scalar_t* grad_out, at::opmath_type<scalar_t>* grad_value) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t r = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / tpr;
  if (r >= value_rows) return;
  const int lane = threadIdx.x & (tpr - 1);
  const int64_t first = bounds[r], last = bounds[r + 1];
  for (int64_t c = lane * VEC; c < channels; c += static_cast<int64_t>(tpr) * VEC) {
    acc_t acc[VEC] = {};
    for (int64_t j = first; j < last; ++j) {
      const int64_t src = order[j];
      const acc_t w = corner_w[src];
      const Pack<scalar_t, VEC> gp = load_pack<scalar_t, VEC>(grad_out + (src / corners_per_row) * channels + c);
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] += w * static_cast<acc_t>(gp.v[k]);
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) grad_value[r * channels + c + k] = acc[k];
  }
}

// Lanes per row: enough VEC-wide lanes to cover D once, at most a warp.
int lanes_per_row(int64_t channels, int vec) {
  const int64_t chunks = (channels + vec - 1) / vec;
  int tpr = 1;
  while (tpr < 32 && tpr < chunks) tpr <<= 1;
  return tpr;
}

int64_t blocks_for_rows(int64_t rows, int tpr) {
  const int64_t rows_per_block = kThreads / tpr;
  return (rows + rows_per_block - 1) / rows_per_block;
}

// The widest vector (16 bytes at most) that divides D and to which every vector-accessed pointer is aligned.
template <typename scalar_t>
int vector_width(int64_t channels, std::initializer_list<const void*> ptrs) {
  for (int vec = static_cast<int>(16 / sizeof(scalar_t)); vec > 1; vec /= 2) {
    bool ok = channels % vec == 0;
    for (const void* p : ptrs) ok = ok && reinterpret_cast<uintptr_t>(p) % (vec * sizeof(scalar_t)) == 0;
    if (ok) return vec;
  }
  return 1;
}

// Calls f(std::integral_constant<int, VEC>) with VEC the runtime `vec` (a power of two <= 16 / sizeof(scalar_t)).
template <typename scalar_t, typename F>
void with_vec(int vec, F&& f) {
  constexpr int kMax = static_cast<int>(16 / sizeof(scalar_t));
  if (vec == 1) {
    f(std::integral_constant<int, 1>{});
  } else if (vec == 2) {
    f(std::integral_constant<int, 2>{});
  } else if constexpr (kMax >= 4) {
    if (vec == 4) {
      f(std::integral_constant<int, 4>{});
    } else if constexpr (kMax >= 8) {
      f(std::integral_constant<int, 8>{});
    }
  }
}

void check_cuda_extent(const Dims& dm) {
  TORCH_CHECK(dm.spatial < std::numeric_limits<int32_t>::max(), "ms_deform_attn: value has S=", dm.spatial,
              " positions; the CUDA kernel indexes a level with int32");
}

at::Tensor ms_deform_attn_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                               const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                               const at::Tensor& attention_weights, bool attention_logits,
                               at::OptionalIntArrayRef points_per_level, bool discrete) {
  const Dims dm = msda::check_args(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                   points_per_level, discrete);
  check_cuda_extent(dm);
  c10::cuda::CUDAGuard guard(value.device());
  const at::Tensor shapes = spatial_shapes.contiguous(), starts = level_start_index.contiguous();
  const at::Tensor v = value.contiguous(), loc = sampling_locations.contiguous(), w = attention_weights.contiguous();
  at::Tensor out = at::empty({dm.batch, dm.queries, dm.heads * dm.channels}, value.options());
  if (out.numel() == 0) return out;
  const int64_t rows = dm.batch * dm.queries * dm.heads;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  msda::dispatch_types(value, loc, [&](auto value_tag, auto geo_tag) {
    using scalar_t = decltype(value_tag);
    using geo_t = decltype(geo_tag);
    const int vec = vector_width<scalar_t>(dm.channels, {v.data_ptr(), out.data_ptr()});
    const int tpr = lanes_per_row(dm.channels, vec);
    with_vec<scalar_t>(vec, [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      forward_kernel<scalar_t, geo_t, VEC><<<blocks_for_rows(rows, tpr), kThreads, 0, stream>>>(
          dm, tpr, v.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
          loc.data_ptr<geo_t>(), w.data_ptr<geo_t>(), attention_logits, out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    bool attention_logits, at::OptionalIntArrayRef points_per_level, bool discrete) {
  const Dims dm = msda::check_args(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                   points_per_level, discrete);
  check_cuda_extent(dm);
  const int64_t rows = dm.batch * dm.queries * dm.heads;
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  // the deterministic gather writes every grad_value element: no zero fill to pay for (the atomics add into zeros)
  const bool gathered = deterministic && rows > 0 && value.numel() > 0;
  const msda::Grads grads =
      msda::backward_buffers(grad_output, dm, value, sampling_locations, attention_weights, true, !gathered);
  c10::cuda::CUDAGuard guard(value.device());
  const at::Tensor shapes = spatial_shapes.contiguous(), starts = level_start_index.contiguous();
  const at::Tensor v = value.contiguous(), loc = sampling_locations.contiguous(), w = attention_weights.contiguous();
  const at::Tensor g = grad_output.contiguous().to(value.scalar_type());
  const at::Tensor &grad_value = grads.value, &grad_loc = grads.loc, &grad_w = grads.weights;
  if (rows == 0 || value.numel() == 0) return grads.finish(value.scalar_type(), attention_weights.scalar_type());
  const int64_t lp = dm.samples;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  msda::dispatch_types(value, loc, [&](auto value_tag, auto geo_tag) {
    using scalar_t = decltype(value_tag);
    using geo_t = decltype(geo_tag);
    using acc_t = at::opmath_type<scalar_t>;
    const int vec = vector_width<scalar_t>(dm.channels, {v.data_ptr(), g.data_ptr()});
    const int tpr = lanes_per_row(dm.channels, vec);
    with_vec<scalar_t>(vec, [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      if (!deterministic) {
        backward_kernel<scalar_t, geo_t, VEC, false><<<blocks_for_rows(rows, tpr), kThreads, 0, stream>>>(
            dm, tpr, g.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(),
            starts.data_ptr<int64_t>(), loc.data_ptr<geo_t>(), w.data_ptr<geo_t>(), attention_logits,
            grad_value.data_ptr<acc_t>(), grad_loc.data_ptr<geo_t>(), grad_w.data_ptr<acc_t>(), nullptr, nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      at::Tensor keys = at::empty({rows * lp * 4}, w.options().dtype(at::kLong));
      at::Tensor corner_w = at::empty({rows * lp * 4}, grad_w.options());
      backward_kernel<scalar_t, geo_t, VEC, true><<<blocks_for_rows(rows, tpr), kThreads, 0, stream>>>(
          dm, tpr, g.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(),
          starts.data_ptr<int64_t>(), loc.data_ptr<geo_t>(), w.data_ptr<geo_t>(), attention_logits,
          grad_value.data_ptr<acc_t>(), grad_loc.data_ptr<geo_t>(), grad_w.data_ptr<acc_t>(), keys.data_ptr<int64_t>(),
          corner_w.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // A stable sort keeps each destination's corners in (row, sample, corner) order, so the sum below adds
      // them in the same order on every run.
      const auto [sorted, order] = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
      const int64_t value_rows = dm.batch * dm.spatial * dm.heads;
      const at::Tensor bounds = at::searchsorted(sorted, at::arange(value_rows + 1, sorted.options()));
      gather_grad_value_kernel<scalar_t, VEC><<<blocks_for_rows(value_rows, tpr), kThreads, 0, stream>>>(
          value_rows, dm.channels, tpr, lp * 4, bounds.data_ptr<int64_t>(), order.data_ptr<int64_t>(),
          corner_w.data_ptr<acc_t>(), g.data_ptr<scalar_t>(), grad_value.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grads.finish(value.scalar_type(), attention_weights.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(dnops, CUDA, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cuda);
  m.impl("_ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

}  // namespace dnops
