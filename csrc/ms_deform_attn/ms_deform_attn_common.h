#pragma once
// Per-sample math of multi-scale deformable attention, shared by the CPU and CUDA kernels so that the CPU
// tests exercise the code the GPU runs.
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace dnops {
namespace msda {

// The top-left corner (x0, y0) and the fractions (lx, ly) of normalized (loc_x, loc_y) on an H x W map, with
// F.grid_sample's align_corners=False convention (pixel x = loc_x * W - 0.5) and zero padding. Returns false
// when no corner lies inside the map, including NaN locations; then the sample and all its gradients are zero
// and the outputs are not set. The bounds are grid_sample's: at x == -1 the right-hand corners are inside with
// weight 0 but a non-zero derivative.
template <typename acc_t, typename index_t>
C10_HOST_DEVICE inline bool bilinear_origin(acc_t loc_x, acc_t loc_y, index_t height, index_t width, index_t& x0,
                                            index_t& y0, acc_t& lx, acc_t& ly) {
  const acc_t x = loc_x * static_cast<acc_t>(width) - static_cast<acc_t>(0.5);
  const acc_t y = loc_y * static_cast<acc_t>(height) - static_cast<acc_t>(0.5);
  if (!(x >= static_cast<acc_t>(-1) && y >= static_cast<acc_t>(-1) && x < static_cast<acc_t>(width) &&
        y < static_cast<acc_t>(height))) {
    return false;
  }
  const acc_t x0f = std::floor(x), y0f = std::floor(y);
  x0 = static_cast<index_t>(x0f);
  y0 = static_cast<index_t>(y0f);
  lx = x - x0f;
  ly = y - y0f;
  return true;
}

// The nearest pixel of normalized coordinate `loc` on an axis of `size` pixels, as discrete sampling reads it:
// clamp(floor(loc * size + 0.5), 0, size - 1) (RT-DETR v2's rounding, clamped per axis). NaN reads as -1, and loc
// is first clamped to [-1, 2], as the reference treats such locations (every pixel index stays finite).
template <typename acc_t, typename index_t>
C10_HOST_DEVICE inline index_t nearest_pixel(acc_t loc, index_t size) {
  acc_t x = loc == loc ? loc : static_cast<acc_t>(-1);
  x = x < static_cast<acc_t>(-1) ? static_cast<acc_t>(-1) : (x > static_cast<acc_t>(2) ? static_cast<acc_t>(2) : x);
  const acc_t pixel = std::floor(x * static_cast<acc_t>(size) + static_cast<acc_t>(0.5));
  if (pixel < static_cast<acc_t>(0)) return 0;
  return pixel > static_cast<acc_t>(size - 1) ? size - 1 : static_cast<index_t>(pixel);
}

// Which level each of a (query, head) row's points samples. With one count P for every level the row holds L * P
// points, level l's at [l * P, (l + 1) * P); with a count per level (RT-DETR v2, D-FINE, DEIM) level l's points are
// [start[l], start[l + 1]). Passed by value to the GPU kernels, hence the fixed capacity.
struct PointLayout {
  static constexpr int kMaxLevels = 16;
  int32_t points;  // P when every level has P points, 0 with a count per level
  int32_t start[kMaxLevels + 1];

  C10_HOST_DEVICE int64_t begin(int64_t level) const { return points ? level * points : start[level]; }
  C10_HOST_DEVICE int64_t count(int64_t level) const { return points ? points : start[level + 1] - start[level]; }
  // int32 arithmetic (a row's points number < 2^31: check_args): a 64-bit division is a call on the GPU. With a
  // count per level, the number of level starts at or below i over the whole fixed-size table: constant indices,
  // which a GPU kernel reads from its parameters (an index that varies would copy the table to local memory).
  C10_HOST_DEVICE int level_of(int i, int levels) const {
    if (points) return i / points;
    int level = 0;
    for (int l = 1; l < kMaxLevels; ++l) level += l < levels && i >= start[l];
    return level;
  }
};

// Whether a height x width level starting at position `start` lies inside a value of `spatial` positions, without
// forming a product that could overflow. The kernels test it before reading a level, so that inconsistent
// spatial_shapes / level_start_index never make them read outside value (on the GPU those live in device memory
// and are not checked on the host); such a level reads as zeros.
template <typename index_t>
C10_HOST_DEVICE inline bool level_fits(index_t height, index_t width, index_t start, index_t spatial) {
  return height >= 1 && width >= 1 && start >= 0 && start <= spatial && height <= spatial - start &&
         width <= (spatial - start) / height;
}

// Corner k of the four (0: (x0, y0), 1: (x0 + 1, y0), 2: (x0, y0 + 1), 3: (x0 + 1, y0 + 1)) lies inside the map.
template <typename index_t>
C10_HOST_DEVICE inline bool corner_inside(int k, index_t x0, index_t y0, index_t height, index_t width) {
  const index_t x = x0 + (k & 1), y = y0 + (k >> 1);
  return x >= 0 && x < width && y >= 0 && y < height;
}

// Row-major position of corner k inside the level (meaningful when the corner is inside the map).
template <typename index_t>
C10_HOST_DEVICE inline index_t corner_offset(int k, index_t x0, index_t y0, index_t width) {
  return (y0 + (k >> 1)) * width + x0 + (k & 1);
}

// Bilinear weight of corner k and its derivatives in pixel units, from the fractions of bilinear_origin.
template <typename acc_t>
C10_HOST_DEVICE inline void corner_weight(int k, acc_t lx, acc_t ly, acc_t& w, acc_t& dwdx, acc_t& dwdy) {
  const acc_t wx = (k & 1) ? lx : static_cast<acc_t>(1) - lx;
  const acc_t wy = (k >> 1) ? ly : static_cast<acc_t>(1) - ly;
  w = wx * wy;
  dwdx = (k & 1) ? wy : -wy;
  dwdy = (k >> 1) ? wx : -wx;
}

// For the four corners' values gv[k] (a sample's dot products with grad_output): the sums of gv[k] times corner k's
// bilinear weight (ga) and times its derivatives in pixel units (gx, gy), factored along x first: the top edge's
// interpolation (1 - lx) * gv[0] + lx * gv[1] and the bottom edge's, then along y. Equal to summing corner_weight's
// terms, in 8 operations instead of 12 multiply-adds over per-corner weights.
template <typename acc_t>
C10_HOST_DEVICE inline void bilinear_sums(const acc_t gv[4], acc_t lx, acc_t ly, acc_t& ga, acc_t& gx, acc_t& gy) {
  const acc_t top_dx = gv[1] - gv[0], bottom_dx = gv[3] - gv[2];
  const acc_t top = gv[0] + lx * top_dx, bottom = gv[2] + lx * bottom_dx;
  gy = bottom - top;
  ga = top + ly * gy;
  gx = top_dx + ly * (bottom_dx - top_dx);
}

// The softmax over the n attention logits of one (query, head), as (max, sum of exp(x - max)), so a
// probability is exp(x - max) / sum without storing the row (GPU threads have no per-row scratch).
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline void softmax_stats(const scalar_t* logits, int64_t n, acc_t& mx, acc_t& sum) {
  mx = static_cast<acc_t>(logits[0]);
  for (int64_t i = 1; i < n; ++i) {
    const acc_t x = static_cast<acc_t>(logits[i]);
    mx = x > mx ? x : mx;
  }
  sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(static_cast<acc_t>(logits[i]) - mx);
}

template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline acc_t softmax_prob(scalar_t logit, acc_t mx, acc_t sum) {
  return std::exp(static_cast<acc_t>(logit) - mx) / sum;
}

// Turns the gradient of the probabilities of one row into that of its logits, in place:
// g_logit = p * (g_p - sum(p * g_p)).
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline void softmax_backward_inplace(const scalar_t* logits, int64_t n, acc_t* grad) {
  acc_t mx, sum;
  softmax_stats(logits, n, mx, sum);
  acc_t dot = 0;
  for (int64_t i = 0; i < n; ++i) dot += softmax_prob(logits[i], mx, sum) * grad[i];
  for (int64_t i = 0; i < n; ++i) grad[i] = softmax_prob(logits[i], mx, sum) * (grad[i] - dot);
}

// Attention weight i of a row: the given weight, or its softmax probability when the row holds logits.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline acc_t row_weight(const scalar_t* row, int64_t i, bool logits, acc_t mx, acc_t sum) {
  return logits ? softmax_prob(row[i], mx, sum) : static_cast<acc_t>(row[i]);
}

}  // namespace msda
}  // namespace dnops
