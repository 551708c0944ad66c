#pragma once
// The DN attention structure, shared by dn_attn_mask's CPU and CUDA kernels and dn_self_attention's CPU kernel
// (and mirrored by every block-sparse kernel).
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace dnops {

// Queries are laid out [DN part (pad_size) | matching part]. Every query sees the matching keys [pad_size, W);
// a DN query also sees its own group's keys [lo, hi), a matching query no DN key (lo == hi).
C10_HOST_DEVICE inline void dn_group_span(int64_t row, int64_t pad_size, int64_t group_size, int64_t& lo, int64_t& hi) {
  lo = row < pad_size ? row / group_size * group_size : 0;
  hi = row < pad_size ? lo + group_size : 0;
}

// True means "blocked", the nn.MultiheadAttention convention.
C10_HOST_DEVICE inline bool dn_blocked(int64_t row, int64_t col, int64_t pad_size, int64_t group_size) {
  if (col >= pad_size) return false;
  int64_t lo, hi;
  dn_group_span(row, pad_size, group_size, lo, hi);
  return col < lo || col >= hi;
}

inline void check_dn_structure(int64_t pad_size, int64_t group_size, int64_t num_queries) {
  TORCH_CHECK(pad_size >= 0, "dnops: pad_size must be >= 0, got ", pad_size);
  TORCH_CHECK(num_queries >= 0, "dnops: num_queries must be >= 0, got ", num_queries);
  if (pad_size > 0) {
    TORCH_CHECK(group_size > 0, "dnops: group_size must be > 0 when pad_size > 0, got ", group_size);
    TORCH_CHECK(pad_size % group_size == 0, "dnops: pad_size (", pad_size, ") must be a multiple of group_size (",
                group_size, ")");
  }
}

}  // namespace dnops
