#pragma once
// The emulator's stand-in for c10/cuda/CUDAGuard.h: emulated kernels run on CPU tensors, so there is no current
// device to switch.
#include <c10/core/Device.h>

namespace c10 {
namespace cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(c10::DeviceIndex) {}
};

struct OptionalCUDAGuard {
  OptionalCUDAGuard() = default;
  explicit OptionalCUDAGuard(std::optional<c10::Device>) {}
};

}  // namespace cuda
}  // namespace c10
