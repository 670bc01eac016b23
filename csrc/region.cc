// SPDX-License-Identifier: Apache-2.0
// Region descriptors and dispatch to the host and CUDA backends.
#include "epdrt/region.h"

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <random>

#include "epdrt/common.h"

namespace epdrt {
namespace {

// Descriptor layout (little-endian, kRegionDescriptorBytes in all):
//   [0, 8)   magic "EPDRTRG2"      [8, 12)  device type      [12, 16) device index (creator's)
//   [16, 24) nbytes                [24, 32) region id        [32, 36) creator pid
//   [36, 40) reserved (0)          [40, 56) device UUID (zeros for the CPU)
//   [56, 120) backend payload
// Version 1 ("EPDRTRG1", 104 bytes) had no UUID.
constexpr char kMagic[8] = {'E', 'P', 'D', 'R', 'T', 'R', 'G', '2'};
constexpr size_t kUuidOffset = 40;
constexpr size_t kPayloadOffset = 56;
static_assert(kPayloadOffset + kRegionPayloadBytes == kRegionDescriptorBytes, "layout");

template <typename T>
void put(std::vector<uint8_t>& buf, size_t offset, T value) {
  std::memcpy(buf.data() + offset, &value, sizeof(T));
}

template <typename T>
T get(const uint8_t* buf, size_t offset) {
  T value;
  std::memcpy(&value, buf + offset, sizeof(T));
  return value;
}

uint64_t random_region_id() {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  return rng();
}

}  // namespace

RegionDescriptor RegionDescriptor::parse(const uint8_t* data, size_t size) {
  EPDRT_ASSERT(size == kRegionDescriptorBytes, "a region descriptor has ", kRegionDescriptorBytes,
               " bytes, got ", size);
  EPDRT_ASSERT(data != nullptr, "region descriptor is null");
  EPDRT_ASSERT(std::memcmp(data, kMagic, sizeof(kMagic)) == 0,
               "not a region descriptor of this epdrt version (bad magic)");
  RegionDescriptor d;
  const auto type = get<int32_t>(data, 8);
  EPDRT_ASSERT(type == static_cast<int32_t>(DeviceType::kCpu) ||
                   type == static_cast<int32_t>(DeviceType::kCuda),
               "region descriptor names unknown device type ", type);
  d.device = Device{static_cast<DeviceType>(type), get<int32_t>(data, 12)};
  d.nbytes = get<uint64_t>(data, 16);
  d.id = get<uint64_t>(data, 24);
  d.creator_pid = get<int32_t>(data, 32);
  std::memcpy(d.device_uuid.data(), data + kUuidOffset, d.device_uuid.size());
  std::memcpy(d.payload.data(), data + kPayloadOffset, d.payload.size());
  const bool zero_uuid =
      std::all_of(d.device_uuid.begin(), d.device_uuid.end(), [](uint8_t b) { return b == 0; });
  const bool device_ok = d.device.type == DeviceType::kCpu ? d.device.index == 0 && zero_uuid
                                                           : d.device.index >= 0 && !zero_uuid;
  EPDRT_ASSERT(d.nbytes > 0 && d.creator_pid > 0 && get<int32_t>(data, 36) == 0 && device_ok,
               "corrupt region descriptor");
  return d;
}

std::vector<uint8_t> RegionDescriptor::serialize() const {
  std::vector<uint8_t> buf(kRegionDescriptorBytes, 0);
  std::memcpy(buf.data(), kMagic, sizeof(kMagic));
  put<int32_t>(buf, 8, static_cast<int32_t>(device.type));
  put<int32_t>(buf, 12, device.index);
  put<uint64_t>(buf, 16, nbytes);
  put<uint64_t>(buf, 24, id);
  put<int32_t>(buf, 32, creator_pid);
  std::memcpy(buf.data() + kUuidOffset, device_uuid.data(), device_uuid.size());
  std::memcpy(buf.data() + kPayloadOffset, payload.data(), payload.size());
  return buf;
}

void Region::check_open(const char* what) const {
  EPDRT_ASSERT(!closed_, "cannot ", what, ": the region is closed");
}

std::vector<uint8_t> Region::export_descriptor() const {
  check_open("export a region");
  RegionDescriptor d;
  d.device = device_;
  d.device_uuid = device_uuid_;
  d.nbytes = nbytes_;
  d.id = id_;
  d.creator_pid = static_cast<int32_t>(getpid());
  const std::vector<uint8_t> payload = export_payload();
  EPDRT_ASSERT(payload.size() <= d.payload.size(), "backend payload too large");
  std::copy(payload.begin(), payload.end(), d.payload.begin());
  return d.serialize();
}

std::shared_ptr<Region> Region::create(uint64_t nbytes, Device device) {
  EPDRT_ASSERT(nbytes > 0, "a region needs a positive size, got ", nbytes, " bytes");
  const uint64_t id = random_region_id();
  switch (device.type) {
    case DeviceType::kCpu:
      return create_host_region(nbytes, id);
    case DeviceType::kCuda:
      return create_cuda_region(nbytes, device.index, id);
  }
  throw InvalidArgument(detail::concat("unknown device type ", static_cast<int>(device.type)));
}

std::shared_ptr<Region> Region::open(const uint8_t* descriptor, size_t size,
                                     std::optional<int32_t> consumer_device) {
  const RegionDescriptor d = RegionDescriptor::parse(descriptor, size);
  if (d.device.type == DeviceType::kCuda) return open_cuda_region(d, consumer_device);
  return open_host_region(d);
}

}  // namespace epdrt
