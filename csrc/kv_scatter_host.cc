// SPDX-License-Identifier: Apache-2.0
// KV scatter on the host: one memcpy per token, layer and K/V row. A decode step writes one
// token per sequence, so this is a few hundred bytes a row, where a gather/index path through
// torch costs tens of microseconds of dispatch per call.
#include <cstring>

#include "epdrt/kv_scatter.h"

namespace epdrt {

void kv_scatter_host(const KvScatterArgs& a) {
  const auto* key = static_cast<const char*>(a.key);
  const auto* value = static_cast<const char*>(a.value);
  auto* cache = static_cast<char*>(a.cache);
  for (int64_t i = 0; i < a.num_tokens; ++i) {
    const int64_t slot = a.slots_int64 ? static_cast<const int64_t*>(a.slots)[i]
                                       : static_cast<const int32_t*>(a.slots)[i];
    char* dst = cache + (slot / a.block_size) * a.cache_stride_block +
                (slot % a.block_size) * a.cache_stride_token;
    for (int l = 0; l < a.num_layers; ++l) {
      char* row = dst + l * a.cache_stride_layer;
      std::memcpy(row, key + l * a.key_stride_layer + i * a.key_stride_token, a.row_bytes);
      std::memcpy(row + a.cache_stride_kv,
                  value + l * a.value_stride_layer + i * a.value_stride_token, a.row_bytes);
    }
  }
}

}  // namespace epdrt
