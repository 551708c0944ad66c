#pragma once
// The emulator's stand-in for c10/cuda/CUDAStream.h: every emulated launch runs to completion before it returns,
// so one stream object stands for all.
#include <c10/core/Device.h>

struct CUstream_st;
using cudaStream_t = CUstream_st*;

namespace c10 {
namespace cuda {

struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const {  // NOLINT: implicit, as in c10
    return nullptr;
  }
};

inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) {
  return {};
}

}  // namespace cuda
}  // namespace c10
