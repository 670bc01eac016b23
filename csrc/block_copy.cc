// SPDX-License-Identifier: Apache-2.0
// Many-small-block copy on the host: memcpy per op, the byte stream split over threads.
#include "epdrt/block_copy.h"

#include <algorithm>
#include <cstring>
#include <system_error>
#include <thread>
#include <vector>

#include "epdrt/common.h"

namespace epdrt {
namespace {

// Below this many bytes per thread, starting a thread costs more than it saves.
constexpr uint64_t kMinBytesPerThread = uint64_t{4} << 20;
constexpr int kMaxThreads = 64;

// Copies bytes [begin, end) of the concatenation of all ops; op_start[i] is the offset of op i
// in the concatenation (non-decreasing).
void copy_range(const CopyOp* ops, size_t num_ops, const std::vector<uint64_t>& op_start,
                uint64_t begin, uint64_t end) {
  size_t i = std::upper_bound(op_start.begin(), op_start.end(), begin) - op_start.begin() - 1;
  for (uint64_t pos = begin; pos < end && i < num_ops; ++i) {
    const uint64_t skip = pos - op_start[i];
    const uint64_t n = std::min(ops[i].nbytes - skip, end - pos);
    std::memcpy(static_cast<char*>(ops[i].dst) + skip, static_cast<const char*>(ops[i].src) + skip,
                n);
    pos += n;
  }
}

}  // namespace

void block_copy_host(const CopyOp* ops, size_t num_ops, int num_threads) {
  if (num_ops == 0) return;
  EPDRT_ASSERT(ops != nullptr, "block_copy_host: ops is null");
  std::vector<uint64_t> op_start(num_ops);
  uint64_t total = 0;
  for (size_t i = 0; i < num_ops; ++i) {
    EPDRT_ASSERT(ops[i].nbytes == 0 || (ops[i].src != nullptr && ops[i].dst != nullptr),
                 "block_copy_host: op ", i, " has a null pointer");
    op_start[i] = total;
    total += ops[i].nbytes;
  }
  const uint64_t by_size = std::max<uint64_t>(1, total / kMinBytesPerThread);
  const int threads = static_cast<int>(
      std::min<uint64_t>({by_size, uint64_t(std::max(num_threads, 1)), uint64_t{kMaxThreads}}));
  if (threads == 1) {
    copy_range(ops, num_ops, op_start, 0, total);
    return;
  }
  // Thread t copies bytes [t * total / threads, (t + 1) * total / threads): equal shares even
  // when one op is much larger than the others. The calling thread takes share 0.
  std::vector<std::thread> workers;
  workers.reserve(threads - 1);
  uint64_t done = total / threads;  // [0, done): share 0 (the caller) and started workers
  try {
    for (int t = 1; t < threads; ++t) {
      workers.emplace_back(copy_range, ops, num_ops, std::cref(op_start), total * t / threads,
                           total * (t + 1) / threads);
      done = total * (t + 1) / threads;
    }
  } catch (const std::system_error&) {
    // Out of threads: the calling thread takes what no worker took.
    copy_range(ops, num_ops, op_start, done, total);
  }
  copy_range(ops, num_ops, op_start, 0, total / threads);
  for (auto& w : workers) w.join();
}

}  // namespace epdrt
