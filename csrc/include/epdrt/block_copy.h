// SPDX-License-Identifier: Apache-2.0
// Many-small-block copy: the engine behind batched block transfers.
#pragma once

#include <cstddef>
#include <cstdint>

namespace epdrt {

// One copy of nbytes from src to dst. Ranges of different ops must not overlap in dst.
struct CopyOp {
  const void* src;
  void* dst;
  uint64_t nbytes;
};

// Host copies: performs every op with memcpy, spread over up to num_threads threads.
void block_copy_host(const CopyOp* ops, size_t num_ops, int num_threads);

// CUDA copies (only with EPDRT_WITH_CUDA): one kernel launch performs every op on `stream`
// (a cudaStream_t). ops_device is an array of num_ops CopyOp in device memory; src/dst are
// device pointers (or host-mapped memory) visible to the current device. Asynchronous: the
// caller records an event after it to know when the copies are done.
void block_copy_cuda(const CopyOp* ops_device, size_t num_ops, void* stream);

// As above, with a bound on every op's nbytes known to the caller: the launch then gives each op
// no more thread blocks than it can use (the 3-argument form cannot read the sizes on the host).
void block_copy_cuda(const CopyOp* ops_device, size_t num_ops, void* stream,
                     uint64_t max_op_bytes);

}  // namespace epdrt
