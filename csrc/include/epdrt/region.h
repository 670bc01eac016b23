// SPDX-License-Identifier: Apache-2.0
// Memory regions: one arena per cache, shareable with other processes by a small descriptor.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

namespace epdrt {

enum class DeviceType : int32_t { kCpu = 0, kCuda = 1 };

struct Device {
  DeviceType type = DeviceType::kCpu;
  int32_t index = 0;  // CUDA ordinal; 0 for the CPU
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
  static constexpr size_t kDescriptorBytes = 104;

  static std::shared_ptr<Region> create(uint64_t nbytes, Device device);
  // Maps the memory a descriptor names. Throws InvalidArgument for a malformed descriptor and
  // SystemError when the creator is gone or closed the region.
  static std::shared_ptr<Region> open(const uint8_t* descriptor, size_t size);

  virtual ~Region() = default;
  Region(const Region&) = delete;
  Region& operator=(const Region&) = delete;

  std::vector<uint8_t> export_descriptor() const;
  void* data() const noexcept { return data_; }
  uint64_t nbytes() const noexcept { return nbytes_; }
  Device device() const noexcept { return device_; }
  // Random identity shared by the creator and every process that opened the region.
  uint64_t id() const noexcept { return id_; }
  bool is_owner() const noexcept { return owner_; }
  bool is_closed() const noexcept { return closed_; }
  virtual void close() = 0;

 protected:
  Region(uint64_t nbytes, Device device, uint64_t id, bool owner)
      : nbytes_(nbytes), device_(device), id_(id), owner_(owner) {}
  // Backend part of the descriptor (kPayloadBytes at most).
  virtual std::vector<uint8_t> export_payload() const = 0;
  void check_open(const char* what) const;

  static constexpr size_t kPayloadBytes = 64;
  void* data_ = nullptr;
  uint64_t nbytes_;
  Device device_;
  uint64_t id_;
  bool owner_;
  bool closed_ = false;
};

// Backend factories (region_host.cc, region_cuda.cc).
std::shared_ptr<Region> create_host_region(uint64_t nbytes, uint64_t id);
std::shared_ptr<Region> open_host_region(uint64_t nbytes, uint64_t id, int32_t creator_pid,
                                         const uint8_t* payload);
std::shared_ptr<Region> create_cuda_region(uint64_t nbytes, int32_t device_index, uint64_t id);
std::shared_ptr<Region> open_cuda_region(uint64_t nbytes, int32_t device_index, uint64_t id,
                                         int32_t creator_pid, const uint8_t* payload);

// True when the library was compiled with CUDA.
bool cuda_compiled() noexcept;
// Number of usable CUDA devices; 0 without CUDA, a driver or a device.
int32_t cuda_device_count() noexcept;

}  // namespace epdrt
