// SPDX-License-Identifier: Apache-2.0
// CPU regions: anonymous shared memory (memfd) opened by peers through /proc/<pid>/fd.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "epdrt/common.h"
#include "epdrt/region.h"

namespace epdrt {
namespace {

std::string errno_text(const char* call) {
  return detail::concat(call, " failed: ", std::strerror(errno));
}

// Payload: [0, 4) fd in the creator, [8, 16) st_dev, [16, 24) st_ino of the memfd.
struct HostPayload {
  int32_t fd;
  int32_t reserved;
  uint64_t dev;
  uint64_t ino;
};

class HostRegion final : public Region {
 public:
  HostRegion(uint64_t nbytes, uint64_t id, bool owner, int fd, void* data)
      : Region(nbytes, Device{}, Device{}, DeviceUuid{}, id, owner), fd_(fd) {
    data_ = data;
  }

  ~HostRegion() override {
    munmap(data_, nbytes_);
    if (fd_ >= 0) ::close(fd_);
  }

  void close() override {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
    closed_ = true;
  }

 protected:
  std::vector<uint8_t> export_payload() const override {
    struct stat st {};
    if (fstat(fd_, &st) != 0) throw SystemError(errno_text("fstat"));
    HostPayload p{fd_, 0, static_cast<uint64_t>(st.st_dev), static_cast<uint64_t>(st.st_ino)};
    std::vector<uint8_t> out(sizeof(p));
    std::memcpy(out.data(), &p, sizeof(p));
    return out;
  }

 private:
  int fd_;  // the memfd while open; peers open the region through it
};

void* map_shared(int fd, uint64_t nbytes) {
  // MAP_POPULATE pre-faults the arena once, so later copies into it run at memory bandwidth.
  void* data = mmap(nullptr, nbytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
  if (data == MAP_FAILED) throw SystemError(errno_text("mmap"));
  return data;
}

}  // namespace

std::shared_ptr<Region> create_host_region(uint64_t nbytes, uint64_t id) {
  const int fd = memfd_create("epdrt-region", MFD_CLOEXEC);
  if (fd < 0) throw SystemError(errno_text("memfd_create"));
  if (ftruncate(fd, static_cast<off_t>(nbytes)) != 0) {
    const std::string msg = errno_text("ftruncate");
    ::close(fd);
    throw SystemError(msg);
  }
  void* data = nullptr;
  try {
    data = map_shared(fd, nbytes);
  } catch (...) {
    ::close(fd);
    throw;
  }
  return std::make_shared<HostRegion>(nbytes, id, /*owner=*/true, fd, data);
}

std::shared_ptr<Region> open_host_region(const RegionDescriptor& descriptor) {
  const uint64_t nbytes = descriptor.nbytes;
  const uint64_t id = descriptor.id;
  const int32_t creator_pid = descriptor.creator_pid;
  static_assert(sizeof(HostPayload) <= kRegionPayloadBytes, "host payload fits the descriptor");
  HostPayload p;
  std::memcpy(&p, descriptor.payload.data(), sizeof(p));
  const std::string path = detail::concat("/proc/", creator_pid, "/fd/", p.fd);
  const int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    throw SystemError(detail::concat("cannot open CPU region ", id, " of process ", creator_pid,
                                     ": the creator exited or closed it (", path, ": ",
                                     std::strerror(errno), ")"));
  }
  struct stat st {};
  const bool same_file = fstat(fd, &st) == 0 && static_cast<uint64_t>(st.st_dev) == p.dev &&
                         static_cast<uint64_t>(st.st_ino) == p.ino &&
                         static_cast<uint64_t>(st.st_size) == nbytes;
  if (!same_file) {
    ::close(fd);
    throw SystemError(detail::concat("cannot open CPU region ", id, " of process ", creator_pid,
                                     ": the descriptor is stale (fd ", p.fd,
                                     " now names another file)"));
  }
  void* data = nullptr;
  try {
    data = map_shared(fd, nbytes);
  } catch (...) {
    ::close(fd);
    throw;
  }
  // The opener keeps its fd too, so it can export the region onward.
  return std::make_shared<HostRegion>(nbytes, id, /*owner=*/false, fd, data);
}

}  // namespace epdrt
