// The memory hooks of the emulator's counting build. Its kernel translation units are compiled with GCC's
// ThreadSanitizer instrumentation (-fsanitize=thread) but linked without the TSan runtime: every load and store
// the compiled code makes calls one of the __tsan_* functions below, which count the accesses of the running CUDA
// thread to memory outside any stack (device memory, in the model) for the coalescing counts, keyed by the
// instruction's address, so the lanes of a warp that execute one instruction form one request. The atomics of
// the instrumented host code (torch's reference counts) must stay atomic.
#include <cstdint>

#include "cuemu.h"

namespace cuemu {
// The instruction at `pc` of the running CUDA thread loads ('l') or stores ('s') `bytes` at `addr`.
void record_device_access(const void* addr, int bytes, char kind, const void* pc);
}  // namespace cuemu

extern "C" {

void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
void __tsan_read_range(void*, unsigned long) {}
void __tsan_write_range(void*, unsigned long) {}
void __tsan_atomic_thread_fence(int) {
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
}
void __tsan_atomic_signal_fence(int) {}

#define CUEMU_ACCESS(N)                                                  \
  __attribute__((noinline)) void __tsan_read##N(void* a) {               \
    cuemu::record_device_access(a, N, 'l', __builtin_return_address(0)); \
  }                                                                      \
  __attribute__((noinline)) void __tsan_write##N(void* a) {              \
    cuemu::record_device_access(a, N, 's', __builtin_return_address(0)); \
  }                                                                      \
  __attribute__((noinline)) void __tsan_unaligned_read##N(void* a) {     \
    cuemu::record_device_access(a, N, 'l', __builtin_return_address(0)); \
  }                                                                      \
  __attribute__((noinline)) void __tsan_unaligned_write##N(void* a) {    \
    cuemu::record_device_access(a, N, 's', __builtin_return_address(0)); \
  }                                                                      \
  __attribute__((noinline)) void __tsan_volatile_read##N(void* a) {      \
    cuemu::record_device_access(a, N, 'l', __builtin_return_address(0)); \
  }                                                                      \
  __attribute__((noinline)) void __tsan_volatile_write##N(void* a) {     \
    cuemu::record_device_access(a, N, 's', __builtin_return_address(0)); \
  }
CUEMU_ACCESS(1)
CUEMU_ACCESS(2)
CUEMU_ACCESS(4)
CUEMU_ACCESS(8)
CUEMU_ACCESS(16)
#undef CUEMU_ACCESS

#define CUEMU_ATOMIC(BITS, T)                                                               \
  T __tsan_atomic##BITS##_load(const volatile T* a, int) {                                  \
    return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                            \
  }                                                                                         \
  void __tsan_atomic##BITS##_store(volatile T* a, T v, int) {                               \
    __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                               \
  }                                                                                         \
  T __tsan_atomic##BITS##_exchange(volatile T* a, T v, int) {                               \
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                     \
  }                                                                                         \
  T __tsan_atomic##BITS##_fetch_add(volatile T* a, T v, int) {                              \
    return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                      \
  }                                                                                         \
  T __tsan_atomic##BITS##_fetch_sub(volatile T* a, T v, int) {                              \
    return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);                                      \
  }                                                                                         \
  T __tsan_atomic##BITS##_fetch_and(volatile T* a, T v, int) {                              \
    return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST);                                      \
  }                                                                                         \
  T __tsan_atomic##BITS##_fetch_or(volatile T* a, T v, int) {                               \
    return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST);                                       \
  }                                                                                         \
  T __tsan_atomic##BITS##_fetch_xor(volatile T* a, T v, int) {                              \
    return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST);                                      \
  }                                                                                         \
  T __tsan_atomic##BITS##_fetch_nand(volatile T* a, T v, int) {                             \
    return __atomic_fetch_nand(a, v, __ATOMIC_SEQ_CST);                                     \
  }                                                                                         \
  int __tsan_atomic##BITS##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {   \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); \
  }                                                                                         \
  int __tsan_atomic##BITS##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {     \
    return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);  \
  }                                                                                         \
  T __tsan_atomic##BITS##_compare_exchange_val(volatile T* a, T c, T v, int, int) {         \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);       \
    return c;                                                                               \
  }
CUEMU_ATOMIC(8, uint8_t)
CUEMU_ATOMIC(16, uint16_t)
CUEMU_ATOMIC(32, uint32_t)
CUEMU_ATOMIC(64, uint64_t)
#undef CUEMU_ATOMIC

}  // extern "C"
