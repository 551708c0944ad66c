#pragma once
// What depends on the emulated __CUDA_ARCH__ (translate.py defines it just before including this header): the
// 8- and 16-byte float reductions exist from sm_90 on, as in CUDA's own headers.
#include "cuemu.h"

#if __CUDA_ARCH__ >= 900

namespace cuemu {

template <typename V, int N>
inline V atomic_add_vector(V* address, V val, const Loc& loc) {
  const auto addr = reinterpret_cast<std::uintptr_t>(address);
  if (addr % sizeof(V) != 0) {
    fail("misaligned " + std::to_string(sizeof(V)) + "-byte vector atomicAdd: address " + hex_address(addr) +
             " is not a multiple of " + std::to_string(sizeof(V)),
         loc);
  }
  record_atomic(address, sizeof(V), loc);
  float* dst = reinterpret_cast<float*>(address);
  const float* add = reinterpret_cast<const float*>(&val);
  V old;
  float* prev = reinterpret_cast<float*>(&old);
  for (int j = 0; j < N; ++j) prev[j] = fetch_add(dst + j, add[j]);
  return old;
}

}  // namespace cuemu

inline float2 atomicAdd(float2* address, float2 val, const cuemu::Loc& loc = cuemu::Loc::current()) {
  return cuemu::atomic_add_vector<float2, 2>(address, val, loc);
}

inline float4 atomicAdd(float4* address, float4 val, const cuemu::Loc& loc = cuemu::Loc::current()) {
  return cuemu::atomic_add_vector<float4, 4>(address, val, loc);
}

#endif
