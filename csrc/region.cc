// SPDX-License-Identifier: Apache-2.0
// Region descriptors and dispatch to the host and CUDA backends.
#include "epdrt/region.h"

#include <unistd.h>

#include <cstring>
#include <random>

#include "epdrt/common.h"

namespace epdrt {
namespace {

// Descriptor layout (little-endian, kDescriptorBytes in all):
//   [0, 8)   magic "EPDRTRG1"      [8, 12)  device type      [12, 16) device index
//   [16, 24) nbytes                [24, 32) region id        [32, 36) creator pid
//   [36, 40) reserved (0)          [40, 104) backend payload
constexpr char kMagic[8] = {'E', 'P', 'D', 'R', 'T', 'R', 'G', '1'};
constexpr size_t kHeaderBytes = 40;

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

void Region::check_open(const char* what) const {
  EPDRT_ASSERT(!closed_, "cannot ", what, ": the region is closed");
}

std::vector<uint8_t> Region::export_descriptor() const {
  check_open("export a region");
  static_assert(kHeaderBytes + kPayloadBytes == kDescriptorBytes, "descriptor layout");
  std::vector<uint8_t> buf(kDescriptorBytes, 0);
  std::memcpy(buf.data(), kMagic, sizeof(kMagic));
  put<int32_t>(buf, 8, static_cast<int32_t>(device_.type));
  put<int32_t>(buf, 12, device_.index);
  put<uint64_t>(buf, 16, nbytes_);
  put<uint64_t>(buf, 24, id_);
  put<int32_t>(buf, 32, static_cast<int32_t>(getpid()));
  const std::vector<uint8_t> payload = export_payload();
  std::memcpy(buf.data() + kHeaderBytes, payload.data(), payload.size());
  return buf;
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

std::shared_ptr<Region> Region::open(const uint8_t* descriptor, size_t size) {
  EPDRT_ASSERT(size == kDescriptorBytes, "a region descriptor has ", kDescriptorBytes,
               " bytes, got ", size);
  EPDRT_ASSERT(std::memcmp(descriptor, kMagic, sizeof(kMagic)) == 0,
               "not a region descriptor (bad magic)");
  const auto type = get<int32_t>(descriptor, 8);
  const auto index = get<int32_t>(descriptor, 12);
  const auto nbytes = get<uint64_t>(descriptor, 16);
  const auto id = get<uint64_t>(descriptor, 24);
  const auto pid = get<int32_t>(descriptor, 32);
  EPDRT_ASSERT(nbytes > 0 && pid > 0, "corrupt region descriptor");
  const uint8_t* payload = descriptor + kHeaderBytes;
  if (type == static_cast<int32_t>(DeviceType::kCpu)) {
    return open_host_region(nbytes, id, pid, payload);
  }
  if (type == static_cast<int32_t>(DeviceType::kCuda)) {
    return open_cuda_region(nbytes, index, id, pid, payload);
  }
  throw InvalidArgument(detail::concat("region descriptor names unknown device type ", type));
}

}  // namespace epdrt
