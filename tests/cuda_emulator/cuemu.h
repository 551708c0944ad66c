#pragma once
// The CUDA execution model on the CPU, for running dnops' unmodified .cu files in CI (the source step in
// translate.py includes this header after a .cu file's last #include, so torch's headers stay host code).
//
// Each CUDA thread is a fiber; warps are 32 consecutive threads of a block. Warp collectives and __syncthreads
// are rendezvous points: a fiber that reaches one yields, and the scheduler completes the collective once every
// lane the mask names has arrived, or reports what the hardware leaves undefined (see cuemu.cpp). Every report
// names the kernel, block, thread, lane and the .cu line (std::source_location honours the #line directives the
// source step writes).
#include <math.h>  // libstdc++'s math.h puts the float overloads (expf as exp(float), ...) in the global namespace

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <source_location>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct uint3 {
  unsigned x, y, z;
};

struct alignas(8) float2 {
  float x, y;
};

struct alignas(16) float4 {
  float x, y, z, w;
};

inline float2 make_float2(float x, float y) {
  return {x, y};
}

inline float4 make_float4(float x, float y, float z, float w) {
  return {x, y, z, w};
}

constexpr int warpSize = 32;

namespace cuemu {

using Loc = std::source_location;

// What the running CUDA thread sees as its built-in variables.
struct ThreadVars {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};

// The running CUDA thread's variables (a copy: they are registers on the device, not memory the counting build
// should see read); reports an error when host code asks.
ThreadVars vars(const Loc& loc = Loc::current());

enum class Op : uint8_t { Shfl, ShflUp, ShflDown, ShflXor, Ballot, Any, All, SyncWarp, SyncThreads };

// Arrives at a rendezvous and returns this lane's result (the shuffled word, the ballot, the vote).
uint64_t rendezvous(Op op, unsigned mask, uint64_t word, int arg, int width, const Loc& loc);

// Reports an error in the running CUDA thread (or on the host) and does not return to the caller.
[[noreturn]] void fail(const std::string& what, const Loc& loc);

// Counts one atomic of `bytes` bytes at `addr` for the coalescing model (the counting build's memory hooks count
// the loads and stores, see cuemu_count.cpp).
void record_atomic(const void* addr, int bytes, const Loc& loc);

// *address += val, returning the old value, outside the counting build's instrumentation (an atomic is not also
// a load and a store).
float fetch_add(float* address, float val);
double fetch_add(double* address, double val);
int fetch_add(int* address, int val);
unsigned fetch_add(unsigned* address, unsigned val);

// Whether the named mutation of a kernel is switched on (translate.py inserts the checks; tests switch them).
bool mutant(int id);

inline std::string hex_address(std::uintptr_t addr) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(addr));
  return buf;
}

// A reinterpret_cast that checks the alignment the target type needs: on the device a misaligned vector access
// faults (translate.py routes every reinterpret_cast of a .cu file here).
template <typename To, typename From>
inline To reinterpret(From from, const Loc& loc = Loc::current()) {
  if constexpr (std::is_pointer_v<To> && std::is_pointer_v<From>) {
    using T = std::remove_cv_t<std::remove_pointer_t<To>>;
    if constexpr (!std::is_void_v<T>) {
      const auto addr = reinterpret_cast<std::uintptr_t>(from);
      if (addr % alignof(T) != 0) {
        fail("misaligned " + std::to_string(sizeof(T)) + "-byte access: address " + hex_address(addr) +
                 " is not a multiple of " + std::to_string(alignof(T)),
             loc);
      }
    }
  }
  return reinterpret_cast<To>(from);
}

template <typename T>
inline uint64_t to_word(T x) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "a warp shuffle moves at most 8 bytes");
  uint64_t w = 0;
  std::memcpy(&w, &x, sizeof(T));
  return w;
}

template <typename T>
inline T from_word(uint64_t w) {
  T x;
  std::memcpy(&x, &w, sizeof(T));
  return x;
}

// Where a kernel was launched, and its name as the .cu file spells it.
struct Site {
  const char* kernel;
  const char* file;
  unsigned line;
};

// A launch dimension as the caller gave it (an integer may exceed what dim3 holds: the check reports it).
struct Extent {
  uint64_t x = 1, y = 1, z = 1;
  bool negative = false;
  Extent(dim3 d) : x(d.x), y(d.y), z(d.z) {}  // NOLINT: implicit, as CUDA converts
  template <typename I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
  Extent(I v) : x(static_cast<uint64_t>(v)), negative(v < 0) {}  // NOLINT
};

void run_grid(const Site& site, const Extent& grid, const Extent& block, std::size_t shared_bytes,
              const std::function<void()>& body);

// kernel<<<grid, block, shared_bytes, stream>>>(args...): the arguments are converted to the kernel's parameter
// types once, as the CUDA runtime copies them, and every thread calls the kernel on its own copies.
template <typename... P, typename... A>
void launch(const Site& site, const Extent& grid, const Extent& block, std::size_t shared_bytes, const void*,
            void (*kernel)(P...), A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  run_grid(site, grid, block, shared_bytes, [&] { std::apply(kernel, params); });
}

// The stream of a launch: the emulator runs every launch to completion before returning, in launch order.
template <typename S>
inline const void* stream_of(const S&) {
  return nullptr;
}

}  // namespace cuemu

#define threadIdx (::cuemu::vars().thread_idx)
#define blockIdx (::cuemu::vars().block_idx)
#define blockDim (::cuemu::vars().block_dim)
#define gridDim (::cuemu::vars().grid_dim)

// ---- warp collectives and the block barrier ----------------------------------------------------------------------

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize,
                     const cuemu::Loc& loc = cuemu::Loc::current()) {
  return cuemu::from_word<T>(cuemu::rendezvous(cuemu::Op::Shfl, mask, cuemu::to_word(var), src_lane, width, loc));
}

template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                        const cuemu::Loc& loc = cuemu::Loc::current()) {
  return cuemu::from_word<T>(
      cuemu::rendezvous(cuemu::Op::ShflUp, mask, cuemu::to_word(var), static_cast<int>(delta), width, loc));
}

template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                          const cuemu::Loc& loc = cuemu::Loc::current()) {
  return cuemu::from_word<T>(
      cuemu::rendezvous(cuemu::Op::ShflDown, mask, cuemu::to_word(var), static_cast<int>(delta), width, loc));
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                         const cuemu::Loc& loc = cuemu::Loc::current()) {
  return cuemu::from_word<T>(cuemu::rendezvous(cuemu::Op::ShflXor, mask, cuemu::to_word(var), lane_mask, width, loc));
}

inline unsigned __ballot_sync(unsigned mask, int predicate, const cuemu::Loc& loc = cuemu::Loc::current()) {
  return static_cast<unsigned>(cuemu::rendezvous(cuemu::Op::Ballot, mask, predicate != 0, 0, warpSize, loc));
}

inline int __any_sync(unsigned mask, int predicate, const cuemu::Loc& loc = cuemu::Loc::current()) {
  return static_cast<int>(cuemu::rendezvous(cuemu::Op::Any, mask, predicate != 0, 0, warpSize, loc));
}

inline int __all_sync(unsigned mask, int predicate, const cuemu::Loc& loc = cuemu::Loc::current()) {
  return static_cast<int>(cuemu::rendezvous(cuemu::Op::All, mask, predicate != 0, 0, warpSize, loc));
}

inline void __syncwarp(unsigned mask = 0xffffffffu, const cuemu::Loc& loc = cuemu::Loc::current()) {
  cuemu::rendezvous(cuemu::Op::SyncWarp, mask, 0, 0, warpSize, loc);
}

inline void __syncthreads(const cuemu::Loc& loc = cuemu::Loc::current()) {
  cuemu::rendezvous(cuemu::Op::SyncThreads, 0, 0, 0, warpSize, loc);
}

// ---- scalar atomics (every arch); the vector forms are in cuemu_arch.h -------------------------------------------

namespace cuemu {

template <typename T>
inline T atomic_add(T* address, T val, const Loc& loc) {
  if (reinterpret_cast<std::uintptr_t>(address) % alignof(T) != 0) {
    fail("misaligned " + std::to_string(sizeof(T)) + "-byte atomicAdd at address " +
             hex_address(reinterpret_cast<std::uintptr_t>(address)),
         loc);
  }
  record_atomic(address, sizeof(T), loc);
  return fetch_add(address, val);  // fibers never run at once: the read-modify-write is indivisible
}

}  // namespace cuemu

inline float atomicAdd(float* address, float val, const cuemu::Loc& loc = cuemu::Loc::current()) {
  return cuemu::atomic_add(address, val, loc);
}

inline double atomicAdd(double* address, double val, const cuemu::Loc& loc = cuemu::Loc::current()) {
  return cuemu::atomic_add(address, val, loc);
}

inline int atomicAdd(int* address, int val, const cuemu::Loc& loc = cuemu::Loc::current()) {
  return cuemu::atomic_add(address, val, loc);
}

inline unsigned atomicAdd(unsigned* address, unsigned val, const cuemu::Loc& loc = cuemu::Loc::current()) {
  return cuemu::atomic_add(address, val, loc);
}

// ---- integer min / max as the device has them (floating ones are fmin / fmax from math.h) --------------------------

#define CUEMU_MINMAX(T)    \
  inline T min(T a, T b) { \
    return b < a ? b : a;  \
  }                        \
  inline T max(T a, T b) { \
    return a < b ? b : a;  \
  }
CUEMU_MINMAX(int)
CUEMU_MINMAX(unsigned)
CUEMU_MINMAX(long)
CUEMU_MINMAX(unsigned long)
CUEMU_MINMAX(long long)
CUEMU_MINMAX(unsigned long long)
#undef CUEMU_MINMAX
