// The emulator's own tests: kernels that break one rule each (the emulator must report them, see
// tests/test_cuda_emulator.py) and a few correct ones whose results are known. Written as CUDA and compiled only
// through the emulator's source step; op cuemu_broken::run(name, buf) launches kernel `name` on the float
// buffer `buf` (64 or more elements).
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string>

namespace {

// Correct: a warp sum by xor shuffles, a ballot, and shuffles up / down within groups of 8.
__global__ void warp_semantics(float* buf) {
  const int lane = threadIdx.x & 31;
  float x = static_cast<float>(lane);
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  buf[lane] = x;
  const unsigned odd = __ballot_sync(0xffffffffu, lane & 1);
  if (lane == 0) buf[32] = static_cast<float>(odd == 0xaaaaaaaau);
  const int up = __shfl_up_sync(0xffffffffu, lane, 1, 8);
  const int down = __shfl_down_sync(0xffffffffu, lane, 1, 8);
  const int bcast = __shfl_sync(0xffffffffu, lane, 3, 8);
  const bool ok = up == ((lane & 7) == 0 ? lane : lane - 1) && down == ((lane & 7) == 7 ? lane : lane + 1) &&
                  bcast == (lane & ~7) + 3;
  const int all_ok = __all_sync(0xffffffffu, ok);
  if (lane == 0) buf[33] = static_cast<float>(all_ok);
}

// Correct: half the warp leaves, the other half shuffles among itself only.
__global__ void half_warp_exits(float* buf) {
  const int lane = threadIdx.x & 31;
  if (lane >= 16) return;
  float x = 1.f;
  for (int off = 8; off > 0; off >>= 1) x += __shfl_xor_sync(0x0000ffffu, x, off, 16);
  buf[lane] = x;
}

// Half the warp leaves, the rest synchronizes with the whole warp: strict mode reports it, sm_70+ PTX allows it.
__global__ void exited_lane_in_mask(float* buf) {
  const int lane = threadIdx.x & 31;
  if (lane >= 16) return;
  __syncwarp(0xffffffffu);
  buf[lane] = 1.f;
}

// The same, but a lane reads a value from a lane that has left: undefined in either mode.
__global__ void reads_exited_lane(float* buf) {
  const int lane = threadIdx.x & 31;
  if (lane >= 16) return;
  buf[lane] = __shfl_sync(0xffffffffu, 1.f, lane + 16);
}

__global__ void caller_not_in_mask(float* buf) {
  const int lane = threadIdx.x & 31;
  buf[lane] = __shfl_sync(lane == 0 ? 0x2u : 0xffffffffu, 1.f, 0);
}

// Lanes 0-15 shuffle among themselves, but lane 0 reads lane 20, outside that group.
__global__ void source_outside_group(float* buf) {
  const int lane = threadIdx.x & 31;
  const unsigned mask = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  buf[lane] = __shfl_sync(mask, static_cast<float>(lane), lane == 0 ? 20 : lane);
}

__global__ void mixed_intrinsics(float* buf) {
  const int lane = threadIdx.x & 31;
  if (lane & 1) {
    buf[lane] = static_cast<float>(__ballot_sync(0xffffffffu, 1));
  } else {
    buf[lane] = __shfl_sync(0xffffffffu, 1.f, 0);
  }
}

__global__ void bad_width(float* buf) {
  const int lane = threadIdx.x & 31;
  buf[lane] = __shfl_xor_sync(0xffffffffu, 1.f, 1, 12);
}

__global__ void divergent_syncthreads(float* buf) {
  if (threadIdx.x < 64) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  buf[threadIdx.x & 31] = 1.f;
}

// The second warp leaves before the barrier: strict mode reports it, sm_70+ PTX allows it.
__global__ void conditional_syncthreads(float* buf) {
  if (threadIdx.x >= 32) return;
  __syncthreads();
  buf[threadIdx.x] = 1.f;
}

// Lane 0 waits for lane 1 at __syncwarp, lane 1 (and every other thread) waits at the block barrier.
__global__ void deadlock(float* buf) {
  if (threadIdx.x == 0) {
    __syncwarp(0x3u);
  } else {
    __syncthreads();
  }
  buf[0] = 1.f;
}

// A C-style cast, so that the atomic's own alignment check (not reinterpret's) reports it.
__global__ void misaligned_vector_atomic(float* buf) {
  atomicAdd((float4*)(buf + 1 + 4 * threadIdx.x), make_float4(1.f, 1.f, 1.f, 1.f));  // NOLINT
}

__global__ void misaligned_vector_load(float* buf) {
  const float4 v = *reinterpret_cast<const float4*>(buf + 2);
  buf[threadIdx.x] = v.x;
}

__global__ void nothing(float*) {}

void run(const std::string& name, const at::Tensor& buf) {
  TORCH_CHECK(buf.numel() >= 160 && buf.scalar_type() == at::kFloat, "cuemu_broken::run needs 160 floats");
  float* p = buf.data_ptr<float>();
  if (name == "warp_semantics") {
    warp_semantics<<<1, 32>>>(p);
  } else if (name == "half_warp_exits") {
    half_warp_exits<<<1, 32>>>(p);
  } else if (name == "exited_lane_in_mask") {
    exited_lane_in_mask<<<1, 32>>>(p);
  } else if (name == "reads_exited_lane") {
    reads_exited_lane<<<1, 32>>>(p);
  } else if (name == "caller_not_in_mask") {
    caller_not_in_mask<<<1, 32>>>(p);
  } else if (name == "source_outside_group") {
    source_outside_group<<<1, 32>>>(p);
  } else if (name == "mixed_intrinsics") {
    mixed_intrinsics<<<1, 32>>>(p);
  } else if (name == "bad_width") {
    bad_width<<<1, 32>>>(p);
  } else if (name == "divergent_syncthreads") {
    divergent_syncthreads<<<1, 128>>>(p);
  } else if (name == "conditional_syncthreads") {
    conditional_syncthreads<<<1, 64>>>(p);
  } else if (name == "deadlock") {
    deadlock<<<1, 64>>>(p);
  } else if (name == "misaligned_vector_atomic") {
    misaligned_vector_atomic<<<1, 2>>>(p);
  } else if (name == "misaligned_vector_load") {
    misaligned_vector_load<<<1, 2>>>(p);
  } else if (name == "empty_grid") {
    nothing<<<0, 32>>>(p);
  } else if (name == "too_many_threads") {
    nothing<<<1, 2048>>>(p);
  } else if (name == "grid_y_too_large") {
    nothing<<<dim3(1, 65536), 32>>>(p);
  } else if (name == "mask_names_missing_lane") {
    half_warp_exits<<<1, 8>>>(p);  // mask 0xffff names lanes 8-15 of a block of 8 threads
  } else {
    TORCH_CHECK(false, "cuemu_broken::run: no kernel ", name);
  }
}

}  // namespace

TORCH_LIBRARY(cuemu_broken, m) {
  m.def("run(str name, Tensor buf) -> ()", &run);
}
