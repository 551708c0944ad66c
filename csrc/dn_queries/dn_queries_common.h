#pragma once
// Per-slot math of dn_queries, shared by the CPU and CUDA kernels: Philox4x32-10 with Triton's conventions
// (tl.randint4x / tl.rand) and the whole computation of one output slot. dnops/reference/dn_queries.py defines
// the random stream; the Triton kernel draws the same words with tl.randint4x.
#include <c10/macros/Macros.h>

#include <cstdint>

namespace dnops {
namespace dnq {

constexpr int64_t kBlocksPerGroup = 8;

struct Words {
  uint32_t w[4];
};

// Philox4x32-10: counter (c0, c1, 0, 0), key (seed low, seed high), as tl.randint4x(seed, (c1 << 32) | c0).
C10_HOST_DEVICE inline Words philox(uint64_t seed, uint32_t c0, uint32_t c1) {
  uint32_t c[4] = {c0, c1, 0u, 0u};
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t pa = static_cast<uint64_t>(0xD2511F53u) * c[0];
    const uint64_t pb = static_cast<uint64_t>(0xCD9E8D57u) * c[2];
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c[1] ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c[3] ^ k1;
    c[1] = static_cast<uint32_t>(pb);
    c[3] = static_cast<uint32_t>(pa);
    c[0] = n0;
    c[2] = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {{c[0], c[1], c[2], c[3]}};
}

// tl.rand's uint32 -> [0, 1) conversion: reinterpret as int32, fold negatives, scale in float32.
C10_HOST_DEVICE inline float uniform(uint32_t word) {
  int32_t x = static_cast<int32_t>(word);
  if (x < 0) x = ~x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

C10_HOST_DEVICE inline float clamp01(float x) {
  return x < 0.f ? 0.f : (x > 1.f ? 1.f : x);
}

struct Layout {
  int64_t pad;         // slots per image = groups * group_size
  int64_t group_size;  // max_gt, times 2 for CDN
  int64_t max_gt;      // GT slots per image per group (per polarity for CDN)
  bool contrastive;
  int64_t num_classes;
  float flip_prob;
  float box_scale;
  uint64_t seed;
  bool abs_size;  // CDN: a size whose corners crossed is their distance (D-FINE / DEIM), not 0
};

struct Slot {
  int64_t label;
  float box[4];
  int64_t gt_index;
  bool negative;
};

// Slot s of image b whose GT rows start at `start` (count of them `count`); gt_labels / gt_boxes are the flat
// (K,) and (K, 4) inputs.
template <typename box_t>
C10_HOST_DEVICE inline Slot make_slot(const Layout& lay, int64_t s, int64_t start, int64_t count,
                                      const int64_t* gt_labels, const box_t* gt_boxes) {
  const int64_t group = s / lay.group_size;
  const int64_t within = s % lay.group_size;
  const bool neg_half = lay.contrastive && within >= lay.max_gt;
  const int64_t j = neg_half ? within - lay.max_gt : within;
  const int64_t used = count < lay.max_gt ? count : lay.max_gt;
  Slot out;
  if (j >= used) {
    out.label = lay.num_classes;
    out.box[0] = out.box[1] = out.box[2] = out.box[3] = 0.5f;
    out.gt_index = -1;
    out.negative = false;
    return out;
  }
  const int64_t k = start + j;
  const uint32_t c0 = static_cast<uint32_t>(k);
  const uint32_t base = static_cast<uint32_t>(group * kBlocksPerGroup + (neg_half ? 3 : 0));
  const Words w0 = philox(lay.seed, c0, base);
  out.label = uniform(w0.w[0]) < lay.flip_prob ? static_cast<int64_t>(w0.w[1] % static_cast<uint64_t>(lay.num_classes))
                                               : gt_labels[k];
  const float cx = static_cast<float>(gt_boxes[4 * k]), cy = static_cast<float>(gt_boxes[4 * k + 1]);
  const float w = static_cast<float>(gt_boxes[4 * k + 2]), h = static_cast<float>(gt_boxes[4 * k + 3]);
  if (lay.contrastive) {
    const Words mags = philox(lay.seed, c0, base + 1);
    const Words signs = philox(lay.seed, c0, base + 2);
    const float half[4] = {w * 0.5f, h * 0.5f, w * 0.5f, h * 0.5f};
    float xyxy[4] = {cx - w * 0.5f, cy - h * 0.5f, cx + w * 0.5f, cy + h * 0.5f};
    for (int i = 0; i < 4; ++i) {
      const float mag = uniform(mags.w[i]) + (neg_half ? 1.f : 0.f);
      const float sign = uniform(signs.w[i]) < 0.5f ? -1.f : 1.f;
      xyxy[i] = clamp01(xyxy[i] + sign * mag * half[i] * lay.box_scale);
    }
    const float bw = xyxy[2] - xyxy[0], bh = xyxy[3] - xyxy[1];
    out.box[0] = (xyxy[0] + xyxy[2]) * 0.5f;
    out.box[1] = (xyxy[1] + xyxy[3]) * 0.5f;
    out.box[2] = bw > 0.f ? bw : (lay.abs_size ? -bw : 0.f);
    out.box[3] = bh > 0.f ? bh : (lay.abs_size ? -bh : 0.f);
  } else {
    const Words w1 = philox(lay.seed, c0, static_cast<uint32_t>(group * kBlocksPerGroup + 1));
    const float u[4] = {uniform(w0.w[2]), uniform(w0.w[3]), uniform(w1.w[0]), uniform(w1.w[1])};
    const float gt[4] = {cx, cy, w, h};
    const float span[4] = {w * 0.5f, h * 0.5f, w, h};
    for (int i = 0; i < 4; ++i) out.box[i] = clamp01(gt[i] + (u[i] * 2.f - 1.f) * span[i] * lay.box_scale);
  }
  out.gt_index = k;
  out.negative = neg_half;
  return out;
}

}  // namespace dnq
}  // namespace dnops
