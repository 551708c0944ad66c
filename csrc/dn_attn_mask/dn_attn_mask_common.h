#pragma once
// The DN attention structure, shared by the CPU and CUDA kernels (and mirrored by every block-sparse kernel).
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace dnops {

// Queries are laid out [DN part (pad_size) | matching part]. True means "blocked", the nn.MultiheadAttention
// convention: a matching query sees matching keys only; a DN query sees its own group and every matching key.
C10_HOST_DEVICE inline bool dn_blocked(int64_t row, int64_t col, int64_t pad_size, int64_t group_size) {
  if (row >= pad_size) return col < pad_size;
  if (col >= pad_size) return false;
  return row / group_size != col / group_size;
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
