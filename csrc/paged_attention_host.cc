// SPDX-License-Identifier: Apache-2.0
// Paged decode attention on the host. Each work item (a sequence, some of its KV heads) reads its
// K and V rows once from the pages, for all the query heads of those KV heads, with an online
// softmax per query head: memory traffic is the context's K/V, once, where a gather-then-attend
// path moves it three times (read, write, read). Built for the baseline ISA and, on x86-64,
// for AVX2 + FMA, picked at run time.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <system_error>
#include <thread>
#include <vector>

#include "epdrt/common.h"
#include "epdrt/paged_attention.h"

namespace epdrt {
namespace {

constexpr int kMaxHeadDim = 256;
constexpr int kMaxRows = 64;    // query heads one work item attends for
constexpr int kMaxBlock = 256;  // tokens per block
// Below this many K/V elements per thread, a thread costs more than it saves.
constexpr int64_t kMinElementsPerThread = int64_t{1} << 18;

// KV heads per work item: as many as fit kMaxRows query rows.
int heads_per_item(const PagedDecodeArgs& a) {
  const int group = a.num_heads / a.num_kv_heads;
  return std::max(1, std::min(a.num_kv_heads, kMaxRows / group));
}

// One thread's buffers for a block of a work item's KV heads: pointers to each token's K and V
// rows, and (fp16/bf16 pages) those rows converted to fp32. Made once per thread and call.
class BlockScratch {
 public:
  BlockScratch(const PagedDecodeArgs& a, int heads)
      : heads_(heads),
        block_(a.block_size),
        dim_(a.head_dim),
        rows_(size_t(2) * heads * a.block_size),
        converted_(a.type == FloatType::kFloat32 ? 0 : rows_.size() * a.head_dim) {}

  // The block's row pointers of K (kv 0) or V (kv 1) for head h of the item: [block_size].
  const float** rows(int kv, int h) { return rows_.data() + (size_t(kv) * heads_ + h) * block_; }
  float* converted_row(int kv, int h, int t) {
    return converted_.data() + ((size_t(kv) * heads_ + h) * block_ + t) * dim_;
  }

 private:
  int heads_, block_, dim_;
  std::vector<const float*> rows_;
  std::vector<float> converted_;
};

namespace baseline {
#include "paged_attention_host_kernel.inc"
}  // namespace baseline

// The same code for AVX2 with FMA (Haswell and later; 8 floats per instruction), picked at run
// time where the CPU has them.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define EPDRT_HOST_AVX2 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace avx2 {
#include "paged_attention_host_kernel.inc"
}  // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

using AttendRange = void (*)(const PagedDecodeArgs&, int64_t, int64_t);

AttendRange pick_attend_range() {
#ifdef EPDRT_HOST_AVX2
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return avx2::attend_range;
#endif
  return baseline::attend_range;
}

}  // namespace

void paged_decode_host(const PagedDecodeArgs& a, int num_threads) {
  static const AttendRange attend_range = pick_attend_range();
  EPDRT_ASSERT(a.head_dim > 0 && a.head_dim <= kMaxHeadDim, "paged_decode_host: head_dim ",
               a.head_dim, " is not in [1, ", kMaxHeadDim, "]");
  EPDRT_ASSERT(a.block_size > 0 && a.block_size <= kMaxBlock, "paged_decode_host: block_size ",
               a.block_size, " is not in [1, ", kMaxBlock, "]");
  EPDRT_ASSERT(a.num_kv_heads > 0 && a.num_heads % a.num_kv_heads == 0 &&
                   a.num_heads / a.num_kv_heads <= kMaxRows,
               "paged_decode_host: ", a.num_heads, " query heads over ", a.num_kv_heads,
               " KV heads (at most ", kMaxRows, " per KV head)");
  const int step = heads_per_item(a);
  const int64_t items = int64_t(a.batch) * ((a.num_kv_heads + step - 1) / step);
  if (items == 0) return;
  int64_t elements = 0;
  for (int s = 0; s < a.batch; ++s) elements += int64_t(a.context_lens[s]) * a.head_dim * 2;
  elements *= a.num_kv_heads;
  const int64_t by_size = std::max<int64_t>(1, elements / kMinElementsPerThread);
  const int threads =
      static_cast<int>(std::min<int64_t>({by_size, int64_t(std::max(num_threads, 1)), items}));
  if (threads == 1) {
    attend_range(a, 0, items);
    return;
  }
  // Thread t takes items [t * items / threads, (t + 1) * items / threads); the caller takes 0.
  std::vector<std::thread> workers;
  workers.reserve(threads - 1);
  int64_t started_until = items / threads;
  try {
    for (int t = 1; t < threads; ++t) {
      workers.emplace_back(attend_range, std::cref(a), items * t / threads,
                           items * (t + 1) / threads);
      started_until = items * (t + 1) / threads;
    }
  } catch (const std::system_error&) {
    attend_range(a, started_until, items);  // out of threads: the caller does the rest
  }
  attend_range(a, 0, items / threads);
  for (auto& w : workers) w.join();
}

}  // namespace epdrt
