// SPDX-License-Identifier: Apache-2.0
// Many-small-block copy on the GPU: one launch performs a whole list of CopyOp.
//
// Grid: x walks the ops (grid-stride when there are more ops than x blocks), y splits one op
// into tiles of kTileBytes dealt round-robin, so a few large ops still fill the GPU. Each op
// picks the widest access (16, 8, 4, 2 bytes) that its src and dst share modulo that width:
// unaligned heads and tails go byte by byte, the body in wide units.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "epdrt/block_copy.h"
#include "epdrt/common.h"

namespace epdrt {
namespace {

constexpr int kThreads = 256;
constexpr uint32_t kUnroll = 4;  // independent loads in flight per thread
constexpr uint64_t kTileBytes = uint64_t{kThreads} * kUnroll * 16;  // 16 KiB of uint4
constexpr uint32_t kMaxSplits = 64;       // gridDim.y: thread blocks sharing one op
constexpr uint64_t kTargetBlocks = 2048;  // enough resident blocks to cover an H100 several times
constexpr uint64_t kMaxGridX = 0x7fffffffu;

// Copies n units of T. Tile t (kThreads * kUnroll units) belongs to thread block y == t % splits;
// all loads of a tile are issued before its stores.
template <typename T>
__device__ __forceinline__ void copy_units(const char* src, char* dst, uint64_t n) {
  const T* __restrict__ s = reinterpret_cast<const T*>(src);
  T* __restrict__ d = reinterpret_cast<T*>(dst);
  constexpr uint64_t kTile = uint64_t{kThreads} * kUnroll;
  for (uint64_t base = blockIdx.y * kTile; base < n; base += uint64_t{gridDim.y} * kTile) {
    T v[kUnroll];
#pragma unroll
    for (uint32_t u = 0; u < kUnroll; ++u) {
      const uint64_t i = base + uint64_t{u} * kThreads + threadIdx.x;
      if (i < n) v[u] = s[i];
    }
#pragma unroll
    for (uint32_t u = 0; u < kUnroll; ++u) {
      const uint64_t i = base + uint64_t{u} * kThreads + threadIdx.x;
      if (i < n) d[i] = v[u];
    }
  }
}

// Byte head up to src's next T boundary, body in T units (dst is then T-aligned too, since
// src and dst agree modulo sizeof(T)), byte tail.
template <typename T>
__device__ __forceinline__ void copy_split(const char* src, char* dst, uint64_t nbytes) {
  constexpr uint64_t kW = sizeof(T);
  const uint64_t misalign = reinterpret_cast<uintptr_t>(src) % kW;
  const uint64_t head = misalign == 0 ? 0 : min(nbytes, kW - misalign);
  const uint64_t body = (nbytes - head) / kW * kW;
  if (head) copy_units<uint8_t>(src, dst, head);
  copy_units<T>(src + head, dst + head, body / kW);
  const uint64_t done = head + body;
  if (done < nbytes) copy_units<uint8_t>(src + done, dst + done, nbytes - done);
}

__global__ void __launch_bounds__(kThreads)
    block_copy_kernel(const CopyOp* __restrict__ ops, uint64_t num_ops) {
  for (uint64_t i = blockIdx.x; i < num_ops; i += gridDim.x) {
    const CopyOp op = ops[i];
    const char* src = static_cast<const char*>(op.src);
    char* dst = static_cast<char*>(op.dst);
    const uintptr_t diff = reinterpret_cast<uintptr_t>(src) ^ reinterpret_cast<uintptr_t>(dst);
    if (diff % 16 == 0) {
      copy_split<uint4>(src, dst, op.nbytes);
    } else if (diff % 8 == 0) {
      copy_split<uint2>(src, dst, op.nbytes);
    } else if (diff % 4 == 0) {
      copy_split<uint32_t>(src, dst, op.nbytes);
    } else if (diff % 2 == 0) {
      copy_split<uint16_t>(src, dst, op.nbytes);
    } else {
      copy_units<uint8_t>(src, dst, op.nbytes);
    }
  }
}

void check_launch(cudaError_t err) {
  if (err == cudaSuccess) return;
  const std::string msg =
      detail::concat("block_copy_cuda launch failed: ", cudaGetErrorString(err));
  if (err == cudaErrorInsufficientDriver || err == cudaErrorNoDevice ||
      err == cudaErrorInvalidDevice) {
    throw CudaUnavailable(msg);
  }
  throw Error(Status::kInternal, msg);
}

}  // namespace

void block_copy_cuda(const CopyOp* ops_device, size_t num_ops, void* stream,
                     uint64_t max_op_bytes) {
  if (num_ops == 0 || max_op_bytes == 0) return;
  EPDRT_ASSERT(ops_device != nullptr, "block_copy_cuda: ops_device is null");
  const uint64_t grid_x = std::min<uint64_t>(num_ops, kMaxGridX);
  // Split ops only while the grid is small, and never into more tiles than an op has.
  const uint64_t want = (kTargetBlocks + grid_x - 1) / grid_x;
  const uint64_t tiles = (max_op_bytes + kTileBytes - 1) / kTileBytes;
  const uint32_t splits =
      static_cast<uint32_t>(std::clamp<uint64_t>(std::min(want, tiles), 1, kMaxSplits));
  const dim3 grid(static_cast<uint32_t>(grid_x), splits);
  block_copy_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(ops_device, num_ops);
  check_launch(cudaGetLastError());
}

void block_copy_cuda(const CopyOp* ops_device, size_t num_ops, void* stream) {
  block_copy_cuda(ops_device, num_ops, stream, UINT64_MAX);
}

}  // namespace epdrt
