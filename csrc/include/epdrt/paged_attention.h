// SPDX-License-Identifier: Apache-2.0
// Paged decode attention on the host: one query per sequence over its K/V pages, read in place.
#pragma once

#include <cstdint>

namespace epdrt {

// Element type of the query, the pages and the output (all the same).
enum class FloatType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// One layer of a paged KV cache and a batch of decode queries. Strides are in elements; every
// head's D values are contiguous. Nothing is checked here: the caller validates (the Python
// dispatcher epdrt.kernels.paged_attention_decode does, before any call).
struct PagedDecodeArgs {
  const void* query;  // [batch, num_heads, head_dim]
  int64_t query_stride_seq;
  int64_t query_stride_head;
  const void* kv;  // [num_blocks, 2 (K, V), block_size, num_kv_heads, head_dim]
  int64_t kv_stride_block;
  int64_t kv_stride_kv;
  int64_t kv_stride_token;
  int64_t kv_stride_head;
  const int32_t* block_tables;  // [batch, table_stride], sequence s's blocks in token order
  int64_t table_stride;
  const int32_t* context_lens;  // [batch], >= 1: tokens each query attends to
  void* out;                    // [batch, num_heads, head_dim], contiguous
  int batch;
  int num_heads;  // a multiple of num_kv_heads (grouped-query attention)
  int num_kv_heads;
  int head_dim;
  int block_size;
  float scale;  // on q . k before the softmax
  FloatType type;
};

// out = softmax(scale * q K^T) V per sequence and query head, K/V read from the pages where
// they lie (no gather), in fp32 with a running (online) softmax. Work items (sequence, KV
// head) are spread over up to num_threads threads (the caller's included). Synchronous.
void paged_decode_host(const PagedDecodeArgs& args, int num_threads);

}  // namespace epdrt
