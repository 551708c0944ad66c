#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <numeric>
#include <type_traits>
#include <vector>

#include "cpu_features.h"
#include "cpu_loops.h"
#include "ms_deform_attn/ms_deform_attn_common.h"
#include "ms_deform_attn/ms_deform_attn_host.h"

namespace dnops {
namespace {

using msda::Dims;

// geo_t: the type of the locations and weights, value's or float32 with a half-precision value (the AMP pair).
template <typename scalar_t, typename geo_t>
struct Args {
  Dims dm;
  const scalar_t* value;
  const int64_t* shapes;
  const int64_t* starts;
  const geo_t* loc;
  const geo_t* weights;
  bool logits;
  const int64_t* order;  // entry n * Lq + i: the (n * Lq + q) of image n's i-th query to visit (query_order)
  // With logits, the backward's (max, sum of exp) of every row, computed once: where levels are split between work
  // items, each would otherwise redo the row's softmax statistics.
  const at::opmath_type<scalar_t>* softmax = nullptr;
};

void check_cpu_shapes(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index, int64_t spatial) {
  const int64_t* shapes = spatial_shapes.data_ptr<int64_t>();
  const int64_t* starts = level_start_index.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t l = 0; l < spatial_shapes.size(0); ++l) {
    const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
    TORCH_CHECK(height > 0 && width > 0, "ms_deform_attn: spatial_shapes[", l, "] = (", height, ", ", width,
                ") must be positive");
    TORCH_CHECK(starts[l] == total, "ms_deform_attn: level_start_index[", l, "] = ", starts[l],
                " but the exclusive cumsum of spatial_shapes gives ", total);
    // H * W <= S - total, tested without forming a product that could overflow
    TORCH_CHECK(msda::level_fits(height, width, total, spatial), "ms_deform_attn: spatial_shapes[", l, "] = (", height,
                ", ", width, ") does not fit in the ", spatial - total, " positions of value (S=", spatial,
                ") after level_start_index[", l, "] = ", total);
    total += height * width;
  }
  TORCH_CHECK(total == spatial, "ms_deform_attn: spatial_shapes cover ", total, " positions but value has S=", spatial);
}

// Up to this many samples per row get their corners computed and prefetched before any is read, so the gathers
// of a row are in flight together instead of one at a time.
constexpr int64_t kMaxPrefetchSamples = 64;

template <typename T>
DNOPS_ALWAYS_INLINE void prefetch_row(const T* p, int64_t channels) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < channels * static_cast<int64_t>(sizeof(T)); off += 64) {
    __builtin_prefetch(bytes + off);
  }
}

// Where one sample falls (bilinear_origin, shared with the CUDA kernel). `interior`: all four corners inside the
// map, true of nearly every sample, which then needs no per-corner bounds test.
template <typename acc_t>
struct Origin {
  int64_t x0, y0;
  acc_t lx, ly;
  bool inside, interior;
};

template <typename acc_t>
DNOPS_ALWAYS_INLINE Origin<acc_t> locate(acc_t loc_x, acc_t loc_y, int64_t height, int64_t width) {
  Origin<acc_t> o;
  o.inside = msda::bilinear_origin(loc_x, loc_y, height, width, o.x0, o.y0, o.lx, o.ly);
  if (!o.inside) o.x0 = o.y0 = 0, o.lx = o.ly = 0;
  o.interior = o.inside && o.x0 >= 0 && o.y0 >= 0 && o.x0 + 1 < width && o.y0 + 1 < height;
  return o;
}

// The four corner rows of a sample in a level whose position 0 is at `base`. A corner outside the map gets
// `outside` instead (a row of zeros to read, or a scratch row to write), so the channel loops run without
// branches: zero padding then adds nothing to the output and nothing to the location's gradient, exactly as in
// grid_sample.
template <typename T, typename acc_t>
DNOPS_ALWAYS_INLINE void corner_rows(const Origin<acc_t>& o, T* base, int64_t height, int64_t width, int64_t row_stride,
                                     T* outside, T* rows[4]) {
  if (o.interior) {
    T* top_left = base + msda::corner_offset(0, o.x0, o.y0, width) * row_stride;
    rows[0] = top_left;
    rows[1] = top_left + row_stride;
    rows[2] = top_left + width * row_stride;
    rows[3] = top_left + (width + 1) * row_stride;
    return;
  }
  for (int k = 0; k < 4; ++k) {
    const bool valid = o.inside && msda::corner_inside<int64_t>(k, o.x0, o.y0, height, width);
    rows[k] = valid ? base + msda::corner_offset(k, o.x0, o.y0, width) * row_stride : outside;
  }
}

// The row of the one pixel a discrete sample reads, in a level whose position 0 is at `base`.
template <typename T, typename acc_t>
DNOPS_ALWAYS_INLINE T* nearest_row(acc_t loc_x, acc_t loc_y, T* base, int64_t height, int64_t width,
                                   int64_t row_stride) {
  return base + (msda::nearest_pixel(loc_y, height) * width + msda::nearest_pixel(loc_x, width)) * row_stride;
}

// One sample's corner rows of value and their weights (the forward folds the attention weight into them, the
// backward keeps the bilinear weights alone).
template <typename scalar_t, typename acc_t>
struct Taps {
  const scalar_t* value[4];
  acc_t weight[4];
};

// acc += the sample's bilinear interpolation. The restrict-qualified parameters tell GCC that acc aliases no
// corner row; without them it falls back to a scalar loop.
template <int64_t kD, typename scalar_t, typename acc_t>
DNOPS_ALWAYS_INLINE void accumulate_taps(acc_t* __restrict__ acc, const Taps<scalar_t, acc_t>& t, int64_t n) {
  const int64_t len = kD > 0 ? kD : n;
  const scalar_t* __restrict__ v0 = t.value[0];
  const scalar_t* __restrict__ v1 = t.value[1];
  const scalar_t* __restrict__ v2 = t.value[2];
  const scalar_t* __restrict__ v3 = t.value[3];
  const acc_t w0 = t.weight[0], w1 = t.weight[1], w2 = t.weight[2], w3 = t.weight[3];
  for (int64_t d = 0; d < len; ++d) {
    acc[d] += w0 * static_cast<acc_t>(v0[d]) + w1 * static_cast<acc_t>(v1[d]) + w2 * static_cast<acc_t>(v2[d]) +
              w3 * static_cast<acc_t>(v3[d]);
  }
}

// Output rows [begin, end) of the N * Lq * M rows; a row is the D channels of one (n, q, m). The heads of a
// query are neighbours, so the corners they read share position rows of value (M * D contiguous elements).
template <typename scalar_t, typename geo_t, int64_t kD>
DNOPS_ALWAYS_INLINE void forward_rows(const Args<scalar_t, geo_t>& a, scalar_t* out, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const Dims& dm = a.dm;
  const int64_t channels = kD > 0 ? kD : dm.channels;
  const int64_t lp = dm.samples;
  const int64_t row_stride = dm.heads * dm.channels;
  const std::vector<scalar_t> zeros(channels, scalar_t(0));
  std::vector<acc_t> acc_any(kD > 0 ? 0 : channels);
  Taps<scalar_t, acc_t> taps[kMaxPrefetchSamples];
  for (int64_t visit = begin; visit < end; ++visit) {
    const int64_t m = visit % dm.heads;
    const int64_t row = a.order[visit / dm.heads] * dm.heads + m;
    const int64_t n = row / (dm.heads * dm.queries);
    const geo_t* loc_row = a.loc + row * lp * 2;
    const geo_t* w_row = a.weights + row * lp;
    acc_t mx = 0, sum = 1;
    if (a.logits) msda::softmax_stats(w_row, lp, mx, sum);
    acc_t acc_fixed[kD > 0 ? kD : 1] = {};
    acc_t* __restrict__ acc = kD > 0 ? acc_fixed : acc_any.data();
    if (kD == 0) std::fill(acc_any.begin(), acc_any.end(), acc_t(0));
    int64_t l = 0, p = 0;  // level and point of the next sample, stepped instead of divided out
    for (int64_t first = 0; first < lp; first += kMaxPrefetchSamples) {
      const int64_t count = std::min(lp - first, kMaxPrefetchSamples);
      for (int64_t j = 0; j < count; ++j) {
        const int64_t i = first + j;
        const scalar_t* base = a.value + ((n * dm.spatial + a.starts[l]) * dm.heads + m) * dm.channels;
        const int64_t height = a.shapes[2 * l], width = a.shapes[2 * l + 1];
        const acc_t loc_x = static_cast<acc_t>(loc_row[2 * i]), loc_y = static_cast<acc_t>(loc_row[2 * i + 1]);
        Taps<scalar_t, acc_t>& t = taps[j];
        const acc_t w = msda::row_weight(w_row, i, a.logits, mx, sum);
        if (dm.discrete) {
          t.value[0] = nearest_row(loc_x, loc_y, base, height, width, row_stride);
          t.weight[0] = w;
          prefetch_row(t.value[0], channels);
        } else {
          const Origin<acc_t> o = locate(loc_x, loc_y, height, width);
          corner_rows(o, base, height, width, row_stride, zeros.data(), t.value);
          for (int k = 0; k < 4; ++k) {
            acc_t bilinear, dwdx, dwdy;
            msda::corner_weight(k, o.lx, o.ly, bilinear, dwdx, dwdy);
            t.weight[k] = w * bilinear;
            prefetch_row(t.value[k], channels);
          }
        }
        if (++p == dm.layout.count(l)) p = 0, ++l;
      }
      if (dm.discrete) {
        for (int64_t j = 0; j < count; ++j) axpy(acc, taps[j].weight[0], taps[j].value[0], channels);
      } else {
        for (int64_t j = 0; j < count; ++j) accumulate_taps<kD>(acc, taps[j], channels);
      }
    }
    scalar_t* out_row = out + row * dm.channels;
    for (int64_t d = 0; d < channels; ++d) out_row[d] = static_cast<scalar_t>(acc[d]);
  }
}

template <typename scalar_t, typename geo_t, int64_t kD>
DNOPS_TARGET_AVX2 void forward_rows_avx2(const Args<scalar_t, geo_t>& a, scalar_t* out, int64_t begin, int64_t end) {
  forward_rows<scalar_t, geo_t, kD>(a, out, begin, end);
}

template <typename scalar_t, typename geo_t, int64_t kD>
void forward_rows_base(const Args<scalar_t, geo_t>& a, scalar_t* out, int64_t begin, int64_t end) {
  forward_rows<scalar_t, geo_t, kD>(a, out, begin, end);
}

// float32 and bfloat16 rows with D a multiple of 8 go through GCC vector types in the backward: there the
// auto-vectorizer turns the four dot products into in-order scalar sums and spills g, which made the backward 5x
// the forward. (Clang, which lacks __builtin_shuffle, takes the generic loops.)
#if defined(__GNUC__) && !defined(__clang__)
#define DNOPS_MSDA_VECTOR_TYPES 1
typedef float f32x8 __attribute__((vector_size(32), aligned(4)));  // aligned(4): rows start at any float
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16), aligned(2)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x16 __attribute__((vector_size(32), aligned(2)));
typedef uint16_t m16x16 __attribute__((vector_size(32)));

DNOPS_ALWAYS_INLINE f32x8 load_f32x8(const float* p) {
  return *reinterpret_cast<const f32x8*>(p);
}

// A bfloat16 is the upper half of the float32 with the same value: widen the bits and shift them up.
DNOPS_ALWAYS_INLINE f32x8 load_f32x8(const c10::BFloat16* p) {
  const u32x8 bits = __builtin_convertvector(*reinterpret_cast<const u16x8*>(p), u32x8) << 16;
  return reinterpret_cast<const f32x8&>(bits);
}

// Sixteen bfloat16 as two float32 vectors holding channels (0-3, 8-11) and (4-7, 12-15): each 128-bit half
// interleaved with zeros, one instruction per vector where widening in order takes two. A dot product with a
// vector of float32 permuted the same way (kBF16Order) is then the same sum.
DNOPS_ALWAYS_INLINE void load_bf16x16(const c10::BFloat16* p, f32x8& lo, f32x8& hi) {
  const u16x16 x = *reinterpret_cast<const u16x16*>(p);
  const u16x16 zero = {};
  const u16x16 a = __builtin_shuffle(zero, x, m16x16{0, 16, 0, 17, 0, 18, 0, 19, 0, 24, 0, 25, 0, 26, 0, 27});
  const u16x16 b = __builtin_shuffle(zero, x, m16x16{0, 20, 0, 21, 0, 22, 0, 23, 0, 28, 0, 29, 0, 30, 0, 31});
  lo = reinterpret_cast<const f32x8&>(a);
  hi = reinterpret_cast<const f32x8&>(b);
}

// Channel c of each 16 in load_bf16x16's order.
constexpr int kBF16Order[16] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15};
#else
#define DNOPS_MSDA_VECTOR_TYPES 0
#endif

// bfloat16 rows of a multiple of 16 channels are read by load_bf16x16.
template <int64_t kD, typename scalar_t>
constexpr bool kPermutedRows =
    DNOPS_MSDA_VECTOR_TYPES && kD > 0 && kD % 16 == 0 && std::is_same_v<scalar_t, c10::BFloat16>;

template <int64_t kD, typename scalar_t>
constexpr bool kVectorRows = DNOPS_MSDA_VECTOR_TYPES && kD > 0 && kD % 8 == 0 &&
                             (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>);

// One sample's share of the backward: gv[k] = <g, corner k's value row>, and corner k's grad_value row gets
// scale * weight[k] * g (scale = the sample's attention weight).
template <int64_t kD, typename scalar_t, typename acc_t>
DNOPS_ALWAYS_INLINE void corner_grads(const acc_t* __restrict__ g, const acc_t* __restrict__ g_permuted,
                                      const Taps<scalar_t, acc_t>& t, acc_t* const* grad_rows, acc_t scale, int64_t n,
                                      acc_t gv[4]) {
#if DNOPS_MSDA_VECTOR_TYPES
  if constexpr (kVectorRows<kD, scalar_t>) {
    constexpr int64_t kVecs = kD / 8;
    f32x8 gr[kVecs];
    for (int64_t i = 0; i < kVecs; ++i) gr[i] = *reinterpret_cast<const f32x8*>(g + 8 * i);
    f32x8 s[4];
    if constexpr (kPermutedRows<kD, scalar_t>) {
      f32x8 gp[kVecs];
      for (int64_t i = 0; i < kVecs; ++i) gp[i] = *reinterpret_cast<const f32x8*>(g_permuted + 8 * i);
      for (int k = 0; k < 4; ++k) {
        f32x8 lo, hi;
        load_bf16x16(t.value[k], lo, hi);
        s[k] = gp[0] * lo + gp[1] * hi;
        for (int64_t i = 2; i < kVecs; i += 2) {
          load_bf16x16(t.value[k] + 8 * i, lo, hi);
          s[k] += gp[i] * lo + gp[i + 1] * hi;
        }
      }
    } else {
      for (int k = 0; k < 4; ++k) {
        const scalar_t* v = t.value[k];
        s[k] = gr[0] * load_f32x8(v);
        for (int64_t i = 1; i < kVecs; ++i) s[k] += gr[i] * load_f32x8(v + 8 * i);
      }
    }
    // The four horizontal sums at once: lane-pair sums of (s0, s1) and of (s2, s3), of those, then the halves.
    const f32x8 s01 = __builtin_shuffle(s[0], s[1], i32x8{0, 8, 1, 9, 4, 12, 5, 13}) +
                      __builtin_shuffle(s[0], s[1], i32x8{2, 10, 3, 11, 6, 14, 7, 15});
    const f32x8 s23 = __builtin_shuffle(s[2], s[3], i32x8{0, 8, 1, 9, 4, 12, 5, 13}) +
                      __builtin_shuffle(s[2], s[3], i32x8{2, 10, 3, 11, 6, 14, 7, 15});
    const f32x8 halves = __builtin_shuffle(s01, s23, i32x8{0, 1, 8, 9, 4, 5, 12, 13}) +
                         __builtin_shuffle(s01, s23, i32x8{2, 3, 10, 11, 6, 7, 14, 15});
    for (int k = 0; k < 4; ++k) gv[k] = halves[k] + halves[k + 4];
    for (int k = 0; k < 4; ++k) {
      f32x8* y = reinterpret_cast<f32x8*>(grad_rows[k]);
      const float a = scale * t.weight[k];
      for (int64_t i = 0; i < kVecs; ++i) y[i] += a * gr[i];
    }
    return;
  }
#endif
  // kD > 0 fixes the channel count at compile time for the common head dims, so the loops unroll fully.
  const int64_t len = kD > 0 ? kD : n;
  for (int k = 0; k < 4; ++k) gv[k] = dot<acc_t>(g, t.value[k], len);
  for (int k = 0; k < 4; ++k) axpy(grad_rows[k], scale * t.weight[k], g, len);
}

// The backward's work items. Item (n, group of heads, group of levels) owns the slice grad_value[n, the levels'
// positions, the heads, :], so threads never write the same element and the result depends neither on scheduling
// nor on the thread count. Two plans:
// - encoder-like calls (at least a query per four positions of value): neighbouring queries read the same corners,
//   which stay in cache, so the rows streamed per query dominate. An item takes one head (or the heads that share
//   a cache line of grad_value, so no line is written by two items) and all levels: it reads each query's
//   locations, weights and grad_output once and contiguously, and its slice of value and grad_value is its heads'
//   (2.5 MB each per head at enc800, where the largest level's is 15 MB). Levels are grouped only when there are
//   fewer (n, group of heads) pairs than threads.
// - decoder-like calls (fewer queries, each sampling elsewhere): the gathers miss cache, and the heads of a query
//   sample around one reference point, so an item takes one level and all heads, reading whole position rows of
//   value and grad_value (M * D elements). Heads are grouped only when there are fewer (n, level) pairs than
//   threads.
// Items are claimed one at a time, levels in order (DETRs list the largest map first): with one item per level the
// large maps miss cache most, and a static split left one of two threads idle for a third of the backward.
struct WorkPlan {
  int64_t heads_per_item, head_groups, level_groups, items;

  WorkPlan(const Dims& dm, int64_t threads, int64_t grad_bytes) {
    const int64_t levels = std::max<int64_t>(dm.levels, 1);
    auto split = [&](int64_t parts, int64_t others) {  // parts to split into for `threads` items, at most `parts`
      return std::min(parts, std::max<int64_t>(1, (threads + dm.batch * others - 1) / (dm.batch * others)));
    };
    if (4 * dm.queries >= dm.spatial) {
      heads_per_item = std::min(dm.heads, std::max<int64_t>(1, 64 / std::max<int64_t>(1, dm.channels * grad_bytes)));
      head_groups = (dm.heads + heads_per_item - 1) / heads_per_item;
      level_groups = split(levels, head_groups);
    } else {
      level_groups = levels;
      head_groups = split(dm.heads, levels);
      heads_per_item = (dm.heads + head_groups - 1) / head_groups;
      head_groups = (dm.heads + heads_per_item - 1) / heads_per_item;
    }
    items = dm.batch * head_groups * level_groups;
  }

  // The first level of group k (group k covers [first_level(k), first_level(k + 1))).
  int64_t first_level(const Dims& dm, int64_t k) const { return k * dm.levels / level_groups; }
};

// Prefetches the cache lines of [p, p + bytes), for writing when `write`.
DNOPS_ALWAYS_INLINE void prefetch_span(const void* p, int64_t bytes, bool write) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) {
    if (write) {
      __builtin_prefetch(c + off, 1);
    } else {
      __builtin_prefetch(c + off);
    }
  }
}

// How many queries ahead an item prefetches the rows it streams through: each query's locations, weights and
// grad_output, and the lines its location and weight gradients go to. Consecutive queries' rows of one head are
// M rows apart (and the queries come in cell order), a stride the hardware prefetchers do not follow.
constexpr int64_t kStreamAhead = 4;

// The items a thread claims from `next`.
template <typename scalar_t, typename geo_t, int64_t kD>
DNOPS_ALWAYS_INLINE void backward_items(const Args<scalar_t, geo_t>& a, const WorkPlan& plan,
                                        std::atomic<int64_t>& next, const scalar_t* grad_out,
                                        at::opmath_type<scalar_t>* grad_value, geo_t* grad_loc,
                                        at::opmath_type<scalar_t>* grad_w) {
  using acc_t = at::opmath_type<scalar_t>;
  const Dims& dm = a.dm;
  const int64_t channels = kD > 0 ? kD : dm.channels;
  const int64_t lp = dm.samples;
  const int64_t row_stride = dm.heads * dm.channels;
  const std::vector<scalar_t> zeros(channels, scalar_t(0));
  std::vector<acc_t> scratch(channels);  // where corners outside the map write their (zero-weight) gradient
  std::vector<acc_t> g_any(kD > 0 ? 0 : channels);
  acc_t g_fixed[kD > 0 ? kD : 1];
  acc_t* __restrict__ g = kD > 0 ? g_fixed : g_any.data();
  acc_t g_permuted[kD > 0 ? kD : 1];  // g in load_bf16x16's order, for kPermutedRows
  Taps<scalar_t, acc_t> taps[kMaxPrefetchSamples];
  acc_t* grad_rows[kMaxPrefetchSamples][4];
  acc_t frac[kMaxPrefetchSamples][2];  // each sample's (lx, ly), for its gradient sums (bilinear_sums)
  for (int64_t item = next++; item < plan.items; item = next++) {
    const int64_t group = item / (dm.batch * plan.head_groups);
    const int64_t m_begin = item % plan.head_groups * plan.heads_per_item;
    const int64_t m_end = std::min(dm.heads, m_begin + plan.heads_per_item);
    const int64_t n = item / plan.head_groups % dm.batch;
    const int64_t l_begin = plan.first_level(dm, group), l_end = plan.first_level(dm, group + 1);
    const int64_t s_begin = dm.layout.begin(l_begin), span = dm.layout.begin(l_end) - s_begin;
    for (int64_t i = 0; i < dm.queries; ++i) {
      if (i + kStreamAhead < dm.queries) {
        for (int64_t m = m_begin; m < m_end; ++m) {
          const int64_t ahead = a.order[n * dm.queries + i + kStreamAhead] * dm.heads + m;
          const int64_t sample = ahead * lp + s_begin;
          prefetch_span(a.loc + 2 * sample, 2 * span * int64_t(sizeof(geo_t)), false);
          prefetch_span(a.weights + sample, span * int64_t(sizeof(geo_t)), false);
          prefetch_span(grad_loc + 2 * sample, 2 * span * int64_t(sizeof(geo_t)), true);
          prefetch_span(grad_w + sample, span * int64_t(sizeof(acc_t)), true);
          prefetch_row(grad_out + ahead * dm.channels, channels);
        }
      }
      for (int64_t m = m_begin; m < m_end; ++m) {
        const int64_t row = a.order[n * dm.queries + i] * dm.heads + m;
        const geo_t* w_row = a.weights + row * lp;
        const acc_t mx = a.logits ? a.softmax[2 * row] : acc_t(0), sum = a.logits ? a.softmax[2 * row + 1] : acc_t(1);
        const scalar_t* g_row = grad_out + row * dm.channels;
        for (int64_t d = 0; d < channels; ++d) g[d] = static_cast<acc_t>(g_row[d]);
#if DNOPS_MSDA_VECTOR_TYPES
        if constexpr (kPermutedRows<kD, scalar_t>) {
          for (int64_t d = 0; d < kD; ++d) g_permuted[d] = g[d / 16 * 16 + kBF16Order[d % 16]];
        }
#endif
        for (int64_t l = l_begin; l < l_end; ++l) {
          const int64_t height = a.shapes[2 * l], width = a.shapes[2 * l + 1];
          const int64_t level_offset = ((n * dm.spatial + a.starts[l]) * dm.heads + m) * dm.channels;
          const scalar_t* level_value = a.value + level_offset;
          acc_t* level_grad = grad_value + level_offset;
          const int64_t level_end = dm.layout.begin(l) + dm.layout.count(l);
          for (int64_t first = dm.layout.begin(l); first < level_end; first += kMaxPrefetchSamples) {
            const int64_t count = std::min(level_end - first, kMaxPrefetchSamples);
            for (int64_t j = 0; j < count; ++j) {
              const int64_t sample = row * lp + first + j;
              const acc_t loc_x = static_cast<acc_t>(a.loc[2 * sample]),
                          loc_y = static_cast<acc_t>(a.loc[2 * sample + 1]);
              if (dm.discrete) {
                taps[j].value[0] = nearest_row(loc_x, loc_y, level_value, height, width, row_stride);
                grad_rows[j][0] = nearest_row(loc_x, loc_y, level_grad, height, width, row_stride);
                prefetch_row(taps[j].value[0], channels);
                prefetch_row(grad_rows[j][0], channels);
                continue;
              }
              const Origin<acc_t> o = locate(loc_x, loc_y, height, width);
              corner_rows(o, level_value, height, width, row_stride, zeros.data(), taps[j].value);
              corner_rows(o, level_grad, height, width, row_stride, scratch.data(), grad_rows[j]);
              frac[j][0] = o.lx;
              frac[j][1] = o.ly;
              for (int k = 0; k < 4; ++k) {
                // Corners outside the map read zeros, so whatever weight they get adds nothing.
                acc_t dwdx, dwdy;
                msda::corner_weight(k, o.lx, o.ly, taps[j].weight[k], dwdx, dwdy);
                prefetch_row(taps[j].value[k], channels);
                prefetch_row(grad_rows[j][k], channels);
              }
            }
            for (int64_t j = 0; j < count; ++j) {
              const int64_t sample = row * lp + first + j;
              const Taps<scalar_t, acc_t>& t = taps[j];
              const acc_t w = msda::row_weight(w_row, first + j, a.logits, mx, sum);
              if (dm.discrete) {
                // the location gets no gradient
                grad_w[sample] = dot<acc_t>(g, taps[j].value[0], channels);
                grad_loc[2 * sample] = grad_loc[2 * sample + 1] = geo_t(0);
                axpy(grad_rows[j][0], w, g, channels);
                continue;
              }
              acc_t gv[4];
              corner_grads<kD>(g, g_permuted, t, grad_rows[j], w, channels, gv);
              acc_t ga, gx, gy;
              msda::bilinear_sums(gv, frac[j][0], frac[j][1], ga, gx, gy);
              grad_w[sample] = ga;
              grad_loc[2 * sample] = static_cast<geo_t>(w * gx * static_cast<acc_t>(width));
              grad_loc[2 * sample + 1] = static_cast<geo_t>(w * gy * static_cast<acc_t>(height));
            }
          }
        }
      }
    }
  }
}

template <typename scalar_t, typename geo_t, int64_t kD>
DNOPS_TARGET_AVX2 void backward_items_avx2(const Args<scalar_t, geo_t>& a, const WorkPlan& plan,
                                           std::atomic<int64_t>& next, const scalar_t* grad_out,
                                           at::opmath_type<scalar_t>* grad_value, geo_t* grad_loc,
                                           at::opmath_type<scalar_t>* grad_w) {
  backward_items<scalar_t, geo_t, kD>(a, plan, next, grad_out, grad_value, grad_loc, grad_w);
}

template <typename scalar_t, typename geo_t, int64_t kD>
void backward_items_base(const Args<scalar_t, geo_t>& a, const WorkPlan& plan, std::atomic<int64_t>& next,
                         const scalar_t* grad_out, at::opmath_type<scalar_t>* grad_value, geo_t* grad_loc,
                         at::opmath_type<scalar_t>* grad_w) {
  backward_items<scalar_t, geo_t, kD>(a, plan, next, grad_out, grad_value, grad_loc, grad_w);
}

template <typename F>
void dispatch_channels(int64_t channels, F&& f) {
  switch (channels) {
    case 8:
      return f(std::integral_constant<int64_t, 8>{});
    case 16:
      return f(std::integral_constant<int64_t, 16>{});
    case 32:
      return f(std::integral_constant<int64_t, 32>{});
    case 64:
      return f(std::integral_constant<int64_t, 64>{});
    default:
      return f(std::integral_constant<int64_t, 0>{});
  }
}

template <typename scalar_t, typename geo_t>
Args<scalar_t, geo_t> make_args(const Dims& dm, const at::Tensor& value, const at::Tensor& shapes,
                                const at::Tensor& starts, const at::Tensor& loc, const at::Tensor& weights, bool logits,
                                const int64_t* order) {
  return {dm,
          value.data_ptr<scalar_t>(),
          shapes.data_ptr<int64_t>(),
          starts.data_ptr<int64_t>(),
          loc.data_ptr<geo_t>(),
          weights.data_ptr<geo_t>(),
          logits,
          order};
}

// The order in which both passes visit each image's queries. An encoder's queries come level by level in
// row-major order, and sweeping a row of the largest map touches several MB of value (more than L2). Visited
// cell by cell of an 8 x 8 grid over the image (Z-order of the cells, row-major order kept inside a cell), the
// queries of a cell sample one neighbourhood, and a cell's queries still come in runs that are contiguous in
// memory. A query's cell is that of its first head's first-level samples. That only says where the query reads
// when its samples cluster: if the first and last levels' samples of the first head lie more than a cell apart
// on average (e.g. uniform locations), an image keeps its own order, which at least reads the location and
// output rows in sequence. The order depends only on the locations: results stay deterministic and
// independent of the thread count. Below kMinQueries, what the queries read stays in cache anyway.
template <typename scalar_t>
std::vector<int64_t> query_order(const Dims& dm, const scalar_t* loc) {
  constexpr int kBits = 3;
  constexpr int64_t kCells = int64_t(1) << (2 * kBits);
  constexpr float kCell = 1.0f / (1 << kBits);
  constexpr int64_t kMinQueries = 256;
  std::vector<int64_t> order(dm.batch * dm.queries);
  std::iota(order.begin(), order.end(), int64_t(0));
  if (dm.queries < kMinQueries || dm.levels == 0 || dm.samples == 0) return order;
  const int64_t query_stride = dm.heads * dm.samples * 2;
  const int64_t last_level = dm.layout.begin(dm.levels - 1) * 2;
  auto centre = [&](const scalar_t* p, int64_t level, float& x, float& y) {
    const int64_t points = dm.layout.count(level);
    x = y = 0;
    for (int64_t k = 0; k < points; ++k) x += static_cast<float>(p[2 * k]), y += static_cast<float>(p[2 * k + 1]);
    x /= static_cast<float>(points);
    y /= static_cast<float>(points);
  };
  auto cell = [](float c) -> uint32_t {
    const float clamped = c > 0.0f ? (c < 1.0f ? c : 1.0f) : 0.0f;  // NaN -> 0
    return std::min<uint32_t>(static_cast<uint32_t>(clamped * (1 << kBits)), (1u << kBits) - 1);
  };
  std::vector<uint32_t> key(dm.queries);
  std::vector<int64_t> start(kCells + 1);
  for (int64_t n = 0; n < dm.batch; ++n) {
    std::fill(start.begin(), start.end(), int64_t(0));
    double spread = 0;
    for (int64_t q = 0; q < dm.queries; ++q) {
      const scalar_t* first = loc + (n * dm.queries + q) * query_stride;
      float x, y, x_last, y_last;
      centre(first, 0, x, y);
      centre(first + last_level, dm.levels - 1, x_last, y_last);
      const float apart = std::abs(x - x_last) + std::abs(y - y_last);
      spread += apart < 2.0f ? apart : 2.0f;  // NaN or far: counts as far
      const uint32_t cx = cell(x), cy = cell(y);
      uint32_t z = 0;
      for (int b = 0; b < kBits; ++b) z |= ((cx >> b) & 1u) << (2 * b) | ((cy >> b) & 1u) << (2 * b + 1);
      key[q] = z;
      ++start[z + 1];
    }
    if (spread > kCell * static_cast<double>(dm.queries)) continue;
    std::partial_sum(start.begin(), start.end(), start.begin());
    for (int64_t q = 0; q < dm.queries; ++q) order[n * dm.queries + start[key[q]]++] = n * dm.queries + q;
  }
  return order;
}

at::Tensor ms_deform_attn_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                              const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                              const at::Tensor& attention_weights, bool attention_logits,
                              at::OptionalIntArrayRef points_per_level, bool discrete) {
  const Dims dm = msda::check_args(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                   points_per_level, discrete);
  const at::Tensor shapes = spatial_shapes.contiguous(), starts = level_start_index.contiguous();
  check_cpu_shapes(shapes, starts, dm.spatial);
  const at::Tensor v = value.contiguous(), loc = sampling_locations.contiguous(), w = attention_weights.contiguous();
  at::Tensor out = at::empty({dm.batch, dm.queries, dm.heads * dm.channels}, value.options());
  if (out.numel() == 0) return out;
  const bool avx2 = cpu_has_avx2_fma();
  msda::dispatch_types(value, loc, [&](auto value_tag, auto geo_tag) {
    using scalar_t = decltype(value_tag);
    using geo_t = decltype(geo_tag);
    const std::vector<int64_t> order = query_order(dm, loc.data_ptr<geo_t>());
    const Args<scalar_t, geo_t> args =
        make_args<scalar_t, geo_t>(dm, v, shapes, starts, loc, w, attention_logits, order.data());
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    dispatch_channels(dm.channels, [&](auto kd) {
      constexpr int64_t kD = decltype(kd)::value;
      at::parallel_for(0, dm.batch * dm.queries * dm.heads, 256, [&](int64_t begin, int64_t end) {
        if (avx2) {
          forward_rows_avx2<scalar_t, geo_t, kD>(args, out_ptr, begin, end);
        } else {
          forward_rows_base<scalar_t, geo_t, kD>(args, out_ptr, begin, end);
        }
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    bool attention_logits, at::OptionalIntArrayRef points_per_level, bool discrete) {
  const Dims dm = msda::check_args(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                   points_per_level, discrete);
  const at::Tensor shapes = spatial_shapes.contiguous(), starts = level_start_index.contiguous();
  check_cpu_shapes(shapes, starts, dm.spatial);
  const at::Tensor v = value.contiguous(), loc = sampling_locations.contiguous(), w = attention_weights.contiguous();
  const at::Tensor g = grad_output.contiguous().to(value.scalar_type());
  // The work items write every sample's location and weight gradient unless nothing is computed.
  const bool computed = g.numel() > 0 && value.numel() > 0;
  const msda::Grads grads =
      msda::backward_buffers(grad_output, dm, value, sampling_locations, attention_weights, !computed);
  const at::Tensor &grad_value = grads.value, &grad_loc = grads.loc, &grad_w = grads.weights;
  if (computed) {
    const bool avx2 = cpu_has_avx2_fma();
    msda::dispatch_types(value, loc, [&](auto value_tag, auto geo_tag) {
      using scalar_t = decltype(value_tag);
      using geo_t = decltype(geo_tag);
      using acc_t = at::opmath_type<scalar_t>;
      const std::vector<int64_t> order = query_order(dm, loc.data_ptr<geo_t>());
      Args<scalar_t, geo_t> args =
          make_args<scalar_t, geo_t>(dm, v, shapes, starts, loc, w, attention_logits, order.data());
      const int64_t rows = dm.batch * dm.queries * dm.heads, lp = dm.samples;
      std::vector<acc_t> softmax(attention_logits ? 2 * rows : 0);
      if (attention_logits) {
        at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
          for (int64_t row = begin; row < end; ++row) {
            msda::softmax_stats(args.weights + row * lp, lp, softmax[2 * row], softmax[2 * row + 1]);
          }
        });
        args.softmax = softmax.data();
      }
      const scalar_t* g_ptr = g.data_ptr<scalar_t>();
      acc_t* gv_ptr = grad_value.data_ptr<acc_t>();
      geo_t* gl_ptr = grad_loc.data_ptr<geo_t>();
      acc_t* gw_ptr = grad_w.data_ptr<acc_t>();
      const WorkPlan plan(dm, at::get_num_threads(), int64_t(sizeof(acc_t)));
      std::atomic<int64_t> next{0};
      dispatch_channels(dm.channels, [&](auto kd) {
        constexpr int64_t kD = decltype(kd)::value;
        at::parallel_for(0, std::min(plan.items, int64_t(at::get_num_threads())), 1, [&](int64_t, int64_t) {
          if (avx2) {
            backward_items_avx2<scalar_t, geo_t, kD>(args, plan, next, g_ptr, gv_ptr, gl_ptr, gw_ptr);
          } else {
            backward_items_base<scalar_t, geo_t, kD>(args, plan, next, g_ptr, gv_ptr, gl_ptr, gw_ptr);
          }
        });
      });
      if (attention_logits) {
        // The logits' gradient needs the whole row of weight gradients, which several items wrote.
        at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
          for (int64_t row = begin; row < end; ++row) {
            msda::softmax_backward_inplace(args.weights + row * lp, lp, gw_ptr + row * lp);
          }
        });
      }
    });
  }
  return grads.finish(value.scalar_type(), attention_weights.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(dnops, CPU, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cpu);
  m.impl("_ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace dnops
