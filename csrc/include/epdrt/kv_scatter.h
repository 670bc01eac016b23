// SPDX-License-Identifier: Apache-2.0
// KV scatter on the host: new tokens' K and V rows written into paged-cache slots.
#pragma once

#include <cstddef>
#include <cstdint>

namespace epdrt {

// Rows of `row_bytes` (one token's [heads, head_dim] of one layer, packed). Strides in bytes.
// Nothing is checked here: the caller validates (epdrt.kernels.kv_scatter does).
struct KvScatterArgs {
  const void* key;  // [num_layers, num_tokens, row]
  int64_t key_stride_layer;
  int64_t key_stride_token;
  const void* value;  // same shape as key, strides of its own
  int64_t value_stride_layer;
  int64_t value_stride_token;
  void* cache;  // [num_blocks, num_layers, 2 (K, V), block_size, row]
  int64_t cache_stride_block;
  int64_t cache_stride_layer;
  int64_t cache_stride_kv;
  int64_t cache_stride_token;
  const void* slots;  // [num_tokens], slot = block * block_size + offset, unique
  bool slots_int64;   // int64 slots, else int32
  int64_t num_tokens;
  int num_layers;
  int block_size;
  size_t row_bytes;
};

// Copies token i's K and V rows of every layer to slot slots[i]. Synchronous.
void kv_scatter_host(const KvScatterArgs& args);

}  // namespace epdrt
