// SPDX-License-Identifier: Apache-2.0
// CUDA regions: one cudaMalloc allocation per region, shared through CUDA IPC handles.
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
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

// UUIDs of the devices this process sees, by ordinal. Read once: the visible devices do not
// change while a process runs.
const std::vector<DeviceUuid>& visible_device_uuids() {
  static const std::vector<DeviceUuid> uuids = [] {
    std::vector<DeviceUuid> out(static_cast<size_t>(cuda_device_count()));
    for (size_t i = 0; i < out.size(); ++i) {
      cudaDeviceProp prop;
      check_cuda(cudaGetDeviceProperties(&prop, static_cast<int>(i)), "cudaGetDeviceProperties");
      static_assert(sizeof(prop.uuid) == sizeof(DeviceUuid), "a CUDA UUID has 16 bytes");
      std::memcpy(out[i].data(), &prop.uuid, sizeof(DeviceUuid));
    }
    return out;
  }();
  return uuids;
}

// nvidia-smi's spelling, which CUDA_VISIBLE_DEVICES also accepts: GPU-8-4-4-4-12 hex digits.
std::string format_uuid(const DeviceUuid& uuid) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out = "GPU-";
  for (size_t i = 0; i < uuid.size(); ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) out += '-';
    out += kHex[uuid[i] >> 4];
    out += kHex[uuid[i] & 0xf];
  }
  return out;
}

// Ordinal in this process of the device that holds a descriptor's memory.
int32_t local_ordinal(const RegionDescriptor& d) {
  const std::vector<DeviceUuid>& uuids = visible_device_uuids();
  if (uuids.empty()) throw CudaUnavailable("no CUDA device is available on this host");
  const auto it = std::find(uuids.begin(), uuids.end(), d.device_uuid);
  if (it != uuids.end()) return static_cast<int32_t>(it - uuids.begin());
  const char* visible = std::getenv("CUDA_VISIBLE_DEVICES");
  throw SystemError(detail::concat(
      "cannot open CUDA region ", d.id, " of process ", d.creator_pid, ": its memory is on ",
      format_uuid(d.device_uuid), " (device ", d.device.index,
      " there), which is not visible in this process (", uuids.size(),
      " visible device(s), CUDA_VISIBLE_DEVICES=", visible != nullptr ? visible : "unset", ")"));
}

class CudaRegion final : public Region {
 public:
  // device: where the memory lives; opened_on: the device whose context made or mapped it.
  CudaRegion(uint64_t nbytes, int32_t device, int32_t opened_on, const DeviceUuid& uuid,
             uint64_t id, bool owner, void* data)
      : Region(nbytes, Device{DeviceType::kCuda, device}, Device{DeviceType::kCuda, opened_on},
               uuid, id, owner) {
    data_ = data;
  }

  ~CudaRegion() override {
    // Freed or unmapped in the context that made the pointer. No throwing here: errors at
    // teardown (e.g. a driver already shutting down) are ignored.
    int previous = 0;
    cudaGetDevice(&previous);
    cudaSetDevice(opened_on_.index);
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
  const DeviceUuid& uuid = visible_device_uuids()[device_index];
  DeviceGuard guard(device_index);
  void* data = nullptr;
  check_cuda(cudaMalloc(&data, nbytes), "cudaMalloc");
  auto region = std::make_shared<CudaRegion>(nbytes, device_index, device_index, uuid, id,
                                             /*owner=*/true, data);
  std::lock_guard<std::mutex> lock(registry_mu);
  local_regions[id] = region;
  return region;
}

std::shared_ptr<Region> open_cuda_region(const RegionDescriptor& d,
                                         std::optional<int32_t> consumer_device) {
  if (d.creator_pid == static_cast<int32_t>(getpid())) {
    std::lock_guard<std::mutex> lock(registry_mu);
    auto it = local_regions.find(d.id);
    if (it != local_regions.end()) {
      if (auto region = it->second.lock()) return region;
    }
    throw SystemError(detail::concat("CUDA region ", d.id, " no longer exists in this process"));
  }
  const int32_t owner = local_ordinal(d);
  int consumer = 0;
  if (consumer_device) {
    consumer = *consumer_device;
  } else {
    check_cuda(cudaGetDevice(&consumer), "cudaGetDevice");
  }
  check_device_index(consumer);
  // Mapped in the consumer's context when that device can reach the memory, so no context is
  // made on the owner's GPU (hundreds of MiB per process). Without peer access only the owner's
  // device can map it; the engine then copies with cudaMemcpyPeerAsync.
  int can_access = 0;
  if (consumer != owner) {
    check_cuda(cudaDeviceCanAccessPeer(&can_access, consumer, owner), "cudaDeviceCanAccessPeer");
  }
  const int32_t map_on = consumer == owner || can_access != 0 ? consumer : owner;
  DeviceGuard guard(map_on);
  static_assert(sizeof(cudaIpcMemHandle_t) <= kRegionPayloadBytes,
                "IPC handle fits the descriptor payload");
  cudaIpcMemHandle_t handle;
  std::memcpy(&handle, d.payload.data(), sizeof(handle));
  void* data = nullptr;
  // On another device than the owner's, the flag enables peer access to it for this mapping.
  check_cuda(cudaIpcOpenMemHandle(&data, handle, cudaIpcMemLazyEnablePeerAccess),
             "cudaIpcOpenMemHandle");
  return std::make_shared<CudaRegion>(d.nbytes, owner, map_on, d.device_uuid, d.id,
                                      /*owner=*/false, data);
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
std::shared_ptr<Region> open_cuda_region(const RegionDescriptor&, std::optional<int32_t>) {
  no_cuda();
}
bool cuda_compiled() noexcept { return false; }
int32_t cuda_device_count() noexcept { return 0; }

#endif  // EPDRT_WITH_CUDA

}  // namespace epdrt
