#pragma once
// Runtime choice of an AVX2+FMA clone of a hot CPU loop. The extension is compiled for the baseline ISA, so it
// runs anywhere; functions marked DNOPS_TARGET_AVX2 are compiled for AVX2+FMA and called only when the CPU has
// them. The loop bodies are DNOPS_ALWAYS_INLINE templates, inlined into both clones.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define DNOPS_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define DNOPS_HAVE_AVX2_CLONES 1
#else
#define DNOPS_TARGET_AVX2
#define DNOPS_HAVE_AVX2_CLONES 0
#endif
#define DNOPS_ALWAYS_INLINE inline __attribute__((always_inline))

namespace dnops {

inline bool cpu_has_avx2_fma() {
#if DNOPS_HAVE_AVX2_CLONES
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

}  // namespace dnops
