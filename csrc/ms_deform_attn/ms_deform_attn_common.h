#pragma once
// Per-sample math of multi-scale deformable attention, shared by the CPU and CUDA kernels so that the CPU
// tests exercise the code the GPU runs.
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace dnops {
namespace msda {

// The four bilinear corners of one sampling location: offsets are row-major positions inside the level
// (h * W + w), weights are the bilinear weights and dwdx / dwdy their derivatives in pixel units.
template <typename acc_t>
struct Corners {
  int64_t offset[4];
  acc_t weight[4];
  acc_t dwdx[4];
  acc_t dwdy[4];
  bool valid[4];
};

// Fills `c` for normalized (loc_x, loc_y) on an H x W map, with F.grid_sample's align_corners=False
// convention (pixel x = loc_x * W - 0.5) and zero padding. Returns false when no corner lies inside the map,
// including NaN locations; then the sample and all its gradients are zero. The bounds are grid_sample's:
// at x == -1 the right-hand corners are inside with weight 0 but a non-zero derivative.
template <typename acc_t>
C10_HOST_DEVICE inline bool bilinear_corners(acc_t loc_x, acc_t loc_y, int64_t height, int64_t width,
                                             Corners<acc_t>& c) {
  const acc_t x = loc_x * static_cast<acc_t>(width) - static_cast<acc_t>(0.5);
  const acc_t y = loc_y * static_cast<acc_t>(height) - static_cast<acc_t>(0.5);
  if (!(x >= static_cast<acc_t>(-1) && y >= static_cast<acc_t>(-1) && x < static_cast<acc_t>(width) &&
        y < static_cast<acc_t>(height))) {
    return false;
  }
  const acc_t x0f = std::floor(x);
  const acc_t y0f = std::floor(y);
  const int64_t x0 = static_cast<int64_t>(x0f);
  const int64_t y0 = static_cast<int64_t>(y0f);
  const acc_t lx = x - x0f, ly = y - y0f;
  const acc_t hx = static_cast<acc_t>(1) - lx, hy = static_cast<acc_t>(1) - ly;
  const int64_t xs[4] = {x0, x0 + 1, x0, x0 + 1};
  const int64_t ys[4] = {y0, y0, y0 + 1, y0 + 1};
  const acc_t wx[4] = {hx, lx, hx, lx};
  const acc_t wy[4] = {hy, hy, ly, ly};
  const acc_t sx[4] = {-1, 1, -1, 1};
  const acc_t sy[4] = {-1, -1, 1, 1};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    c.valid[i] = xs[i] >= 0 && xs[i] < width && ys[i] >= 0 && ys[i] < height;
    c.offset[i] = c.valid[i] ? ys[i] * width + xs[i] : 0;
    c.weight[i] = wx[i] * wy[i];
    c.dwdx[i] = sx[i] * wy[i];
    c.dwdy[i] = sy[i] * wx[i];
  }
  return true;
}

// The softmax over the n = L * P attention logits of one (query, head), as (max, sum of exp(x - max)), so a
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
