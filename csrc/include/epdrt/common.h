// SPDX-License-Identifier: Apache-2.0
// Error types and checking macros shared by the epdrt C++ core.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

// Function attributes for hot paths (GCC and Clang, the compilers the core builds with):
// always inline, and out of line and cold (error and slow paths kept out of their callers).
#define EPDRT_ALWAYS_INLINE inline __attribute__((always_inline))
#define EPDRT_COLD __attribute__((noinline, cold))

namespace epdrt {

// Status codes shared with the C API (epdrt.h mirrors these values).
enum class Status : int {
  kOk = 0,
  kInvalidArgument = 1,
  kPoolExhausted = 2,
  kCudaUnavailable = 3,
  kSystemError = 4,
  kInternal = 5,
  kTransferFailed = 6,
};

// Base of every exception the core throws; carries the status the C API reports.
class Error : public std::runtime_error {
 public:
  Error(Status status, const std::string& msg) : std::runtime_error(msg), status_(status) {}
  Status status() const noexcept { return status_; }

 private:
  Status status_;
};

// A caller passed something invalid; nothing was changed.
class InvalidArgument : public Error {
 public:
  explicit InvalidArgument(const std::string& msg) : Error(Status::kInvalidArgument, msg) {}
};

// The block pool has too few free blocks; nothing was allocated.
class PoolExhausted : public Error {
 public:
  explicit PoolExhausted(const std::string& msg) : Error(Status::kPoolExhausted, msg) {}
};

// A CUDA feature was used but the build has no CUDA or the host has no usable device.
class CudaUnavailable : public Error {
 public:
  explicit CudaUnavailable(const std::string& msg) : Error(Status::kCudaUnavailable, msg) {}
};

// An operating-system call failed (errno text in the message).
class SystemError : public Error {
 public:
  explicit SystemError(const std::string& msg) : Error(Status::kSystemError, msg) {}
};

// A transfer's copies failed after it was submitted (e.g. a CUDA error); see the message.
class TransferFailed : public Error {
 public:
  explicit TransferFailed(const std::string& msg) : Error(Status::kTransferFailed, msg) {}
};

namespace detail {
template <typename... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

}  // namespace epdrt

// Throws epdrt::InvalidArgument with the streamed message when cond is false.
#define EPDRT_ASSERT(cond, ...)                                                        \
  do {                                                                                 \
    if (!(cond)) throw ::epdrt::InvalidArgument(::epdrt::detail::concat(__VA_ARGS__)); \
  } while (0)
