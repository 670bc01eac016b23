// SPDX-License-Identifier: Apache-2.0
// Memory regions: one arena per cache, shareable with other processes by a small descriptor.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

namespace epdrt {

enum class DeviceType : int32_t { kCpu = 0, kCuda = 1 };

struct Device {
  DeviceType type = DeviceType::kCpu;
  int32_t index = 0;  // CUDA ordinal in the process that holds the Device; 0 for the CPU
};

// A CUDA device's UUID (cudaDeviceProp::uuid): the same in every process of the host, whatever
// its CUDA_VISIBLE_DEVICES, unlike an ordinal. All zeros stands for the CPU.
using DeviceUuid = std::array<uint8_t, 16>;

// Bytes of a region descriptor, and of its backend part (the largest: a cudaIpcMemHandle_t).
constexpr size_t kRegionDescriptorBytes = 120;
constexpr size_t kRegionPayloadBytes = 64;

// The fields of an exported region descriptor; region.cc has the byte layout.
struct RegionDescriptor {
  Device device;             // where the memory lives, numbered as in the creator's process
  DeviceUuid device_uuid{};  // that device's UUID; zeros for the CPU
  uint64_t nbytes = 0;
  uint64_t id = 0;          // the region's random identity
  int32_t creator_pid = 0;  // the process that made the region (and must be alive to open it)
  std::array<uint8_t, kRegionPayloadBytes> payload{};  // backend part (memfd, CUDA IPC handle)

  // Reads kRegionDescriptorBytes bytes; throws InvalidArgument unless they are a well-formed
  // descriptor (size, magic, known device type, fields consistent with it).
  static RegionDescriptor parse(const uint8_t* data, size_t size);
  std::vector<uint8_t> serialize() const;
};

// One contiguous arena of nbytes on a device, created here or opened from a peer's descriptor.
//
// CPU regions are anonymous shared memory (memfd); a peer opens them through
// /proc/<creator pid>/fd/<fd>, so no name ever appears in /dev/shm and nothing leaks when any
// process is killed: the kernel frees the memory when the last mapping goes. CUDA regions are
// one cudaMalloc allocation exported as a CUDA IPC handle.
//
// Ownership: the memory stays valid until this object is destroyed. close() only stops the
// region from being used for new work or exported (the creator's memfd is closed, so peers can
// no longer open it); views handed out earlier keep the object, hence the memory, alive.
class Region {
 public:
  // Size of the descriptor produced by export_descriptor().
  static constexpr size_t kDescriptorBytes = kRegionDescriptorBytes;

  static std::shared_ptr<Region> create(uint64_t nbytes, Device device);
  // Maps the memory a descriptor names. A CUDA region is mapped on consumer_device (a CUDA
  // ordinal of this process; nullopt: the calling thread's current device) when that device can
  // reach the memory (it is the owner's device, or has peer access to it), else on the owner's
  // device. Ignored for CPU regions and for a CUDA region opened by its own creator process
  // (that returns the live object). Throws InvalidArgument for a malformed descriptor and
  // SystemError when the creator is gone, closed the region, or its GPU is not visible here.
  static std::shared_ptr<Region> open(const uint8_t* descriptor, size_t size,
                                      std::optional<int32_t> consumer_device = std::nullopt);

  virtual ~Region() = default;
  Region(const Region&) = delete;
  Region& operator=(const Region&) = delete;

  std::vector<uint8_t> export_descriptor() const;
  void* data() const noexcept { return data_; }
  uint64_t nbytes() const noexcept { return nbytes_; }
  // Where the memory lives, numbered as in this process (CUDA_VISIBLE_DEVICES applied).
  Device device() const noexcept { return device_; }
  // The device whose context maps the memory here: kernels and copies that touch the region
  // run there. device() except for a CUDA region opened on another device than its owner's.
  Device opened_on() const noexcept { return opened_on_; }
  // UUID of device() (zeros for the CPU).
  const DeviceUuid& device_uuid() const noexcept { return device_uuid_; }
  // Random identity shared by the creator and every process that opened the region.
  uint64_t id() const noexcept { return id_; }
  bool is_owner() const noexcept { return owner_; }
  bool is_closed() const noexcept { return closed_; }
  virtual void close() = 0;

 protected:
  Region(uint64_t nbytes, Device device, Device opened_on, const DeviceUuid& device_uuid,
         uint64_t id, bool owner)
      : nbytes_(nbytes),
        device_(device),
        opened_on_(opened_on),
        device_uuid_(device_uuid),
        id_(id),
        owner_(owner) {}
  // Backend part of the descriptor (kRegionPayloadBytes at most).
  virtual std::vector<uint8_t> export_payload() const = 0;
  void check_open(const char* what) const;

  void* data_ = nullptr;
  uint64_t nbytes_;
  Device device_;
  Device opened_on_;
  DeviceUuid device_uuid_;
  uint64_t id_;
  bool owner_;
  bool closed_ = false;
};

// Backend factories (region_host.cc, region_cuda.cc).
std::shared_ptr<Region> create_host_region(uint64_t nbytes, uint64_t id);
std::shared_ptr<Region> open_host_region(const RegionDescriptor& descriptor);
std::shared_ptr<Region> create_cuda_region(uint64_t nbytes, int32_t device_index, uint64_t id);
std::shared_ptr<Region> open_cuda_region(const RegionDescriptor& descriptor,
                                         std::optional<int32_t> consumer_device);

// True when the library was compiled with CUDA.
bool cuda_compiled() noexcept;
// Number of usable CUDA devices; 0 without CUDA, a driver or a device.
int32_t cuda_device_count() noexcept;

}  // namespace epdrt
