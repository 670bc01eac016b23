// SPDX-License-Identifier: Apache-2.0
// CUDA regions: one cudaMalloc allocation per region, shared through CUDA IPC handles.
#include <unistd.h>

#include <cstring>
#include <mutex>
#include <unordered_map>

#include "epdrt/common.h"
#include "epdrt/region.h"
#include "cuda_util.h"

#ifdef EPDRT_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace epdrt {

#ifdef EPDRT_WITH_CUDA
namespace {

using detail::check_cuda;
using detail::DeviceGuard;

void check_device_index(int32_t index) {
  const int32_t count = cuda_device_count();
  if (count == 0) throw CudaUnavailable("no CUDA device is available on this host");
  EPDRT_ASSERT(index >= 0 && index < count, "CUDA device ", index, " does not exist (", count,
               " device(s))");
}

class CudaRegion final : public Region {
 public:
  CudaRegion(uint64_t nbytes, int32_t index, uint64_t id, bool owner, void* data)
      : Region(nbytes, Device{DeviceType::kCuda, index}, id, owner) {
    data_ = data;
  }

  ~CudaRegion() override {
    // No throwing here: errors at teardown (e.g. a driver already shutting down) are ignored.
    int previous = 0;
    cudaGetDevice(&previous);
    cudaSetDevice(device_.index);
    if (owner_) {
      cudaFree(data_);
    } else {
      cudaIpcCloseMemHandle(data_);
    }
    cudaSetDevice(previous);
  }

  void close() override { closed_ = true; }

 protected:
  std::vector<uint8_t> export_payload() const override {
    cudaIpcMemHandle_t handle;
    check_cuda(cudaIpcGetMemHandle(&handle, data_), "cudaIpcGetMemHandle");
    std::vector<uint8_t> out(sizeof(handle));
    std::memcpy(out.data(), &handle, sizeof(handle));
    return out;
  }
};

// CUDA IPC handles cannot be opened in the process that made them: a region opened by its own
// creator process aliases the live object instead.
std::mutex registry_mu;
std::unordered_map<uint64_t, std::weak_ptr<Region>> local_regions;

}  // namespace

std::shared_ptr<Region> create_cuda_region(uint64_t nbytes, int32_t device_index, uint64_t id) {
  check_device_index(device_index);
  DeviceGuard guard(device_index);
  void* data = nullptr;
  check_cuda(cudaMalloc(&data, nbytes), "cudaMalloc");
  auto region = std::make_shared<CudaRegion>(nbytes, device_index, id, /*owner=*/true, data);
  std::lock_guard<std::mutex> lock(registry_mu);
  local_regions[id] = region;
  return region;
}

std::shared_ptr<Region> open_cuda_region(uint64_t nbytes, int32_t device_index, uint64_t id,
                                         int32_t creator_pid, const uint8_t* payload) {
  if (creator_pid == static_cast<int32_t>(getpid())) {
    std::lock_guard<std::mutex> lock(registry_mu);
    auto it = local_regions.find(id);
    if (it != local_regions.end()) {
      if (auto region = it->second.lock()) return region;
    }
    throw SystemError(detail::concat("CUDA region ", id, " no longer exists in this process"));
  }
  check_device_index(device_index);
  DeviceGuard guard(device_index);
  static_assert(sizeof(cudaIpcMemHandle_t) <= 64, "IPC handle fits the descriptor payload");
  cudaIpcMemHandle_t handle;
  std::memcpy(&handle, payload, sizeof(handle));
  void* data = nullptr;
  check_cuda(cudaIpcOpenMemHandle(&data, handle, cudaIpcMemLazyEnablePeerAccess),
             "cudaIpcOpenMemHandle");
  return std::make_shared<CudaRegion>(nbytes, device_index, id, /*owner=*/false, data);
}

bool cuda_compiled() noexcept { return true; }

int32_t cuda_device_count() noexcept {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error of a missing driver
    return 0;
  }
  return count;
}

#else  // !EPDRT_WITH_CUDA

namespace {
[[noreturn]] void no_cuda() {
  throw CudaUnavailable("epdrt was built without CUDA (rebuild with EPDRT_CUDA=ON)");
}
}  // namespace

std::shared_ptr<Region> create_cuda_region(uint64_t, int32_t, uint64_t) { no_cuda(); }
std::shared_ptr<Region> open_cuda_region(uint64_t, int32_t, uint64_t, int32_t, const uint8_t*) {
  no_cuda();
}
bool cuda_compiled() noexcept { return false; }
int32_t cuda_device_count() noexcept { return 0; }

#endif  // EPDRT_WITH_CUDA

}  // namespace epdrt
