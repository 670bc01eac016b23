// SPDX-License-Identifier: Apache-2.0
// Internal CUDA helpers of the core (not installed): error checks and a device guard.
#pragma once

#ifdef EPDRT_WITH_CUDA
#include <cuda_runtime_api.h>

#include <string>

#include "epdrt/common.h"

namespace epdrt::detail {

// Throws CudaUnavailable when there is no usable driver or device, SystemError otherwise.
inline void check_cuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  const std::string msg = concat(what, " failed: ", cudaGetErrorString(err));
  if (err == cudaErrorInsufficientDriver || err == cudaErrorNoDevice ||
      err == cudaErrorInvalidDevice) {
    throw CudaUnavailable(msg);
  }
  throw SystemError(msg);
}

// Makes a device current for one scope and restores the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int index) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != index) check_cuda(cudaSetDevice(index), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace epdrt::detail
#endif  // EPDRT_WITH_CUDA
