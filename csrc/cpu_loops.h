#pragma once
// Channel loops shared by the CPU kernels; inlined into their AVX2+FMA and baseline clones (cpu_features.h).
#include <cstdint>

#include "cpu_features.h"

namespace dnops {

// y[0:n] += a * x[0:n]. The restrict-qualified parameters let GCC vectorize without a run-time alias check.
template <typename acc_t, typename T>
DNOPS_ALWAYS_INLINE void axpy(acc_t* __restrict__ y, acc_t a, const T* __restrict__ x, int64_t n) {
  for (int64_t d = 0; d < n; ++d) y[d] += a * static_cast<acc_t>(x[d]);
}

// sum of x[0:n] * y[0:n] in 8 partial sums, then the tail: one running sum is an in-order reduction that the
// compiler may not reassociate, so it would add one product at a time.
template <typename acc_t, typename T, typename U>
DNOPS_ALWAYS_INLINE acc_t dot(const T* __restrict__ x, const U* __restrict__ y, int64_t n) {
  acc_t part[8] = {};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) {
    for (int64_t i = 0; i < 8; ++i) part[i] += static_cast<acc_t>(x[d + i]) * static_cast<acc_t>(y[d + i]);
  }
  acc_t s = 0;
  for (int64_t i = 0; i < 8; ++i) s += part[i];
  for (; d < n; ++d) s += static_cast<acc_t>(x[d]) * static_cast<acc_t>(y[d]);
  return s;
}

}  // namespace dnops
