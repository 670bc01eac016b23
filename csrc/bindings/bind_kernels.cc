// SPDX-License-Identifier: Apache-2.0
// Kernels that live in the C++ core: many-small-block copy (host and CUDA), KV scatter and
// paged decode attention on the host.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "bindings.h"
#include "epdrt/block_copy.h"
#include "epdrt/common.h"
#include "epdrt/kv_scatter.h"
#include "epdrt/paged_attention.h"

namespace py = pybind11;

namespace epdrt::bindings {

static_assert(sizeof(CopyOp) == 3 * sizeof(int64_t) && alignof(CopyOp) == alignof(int64_t),
              "Python builds CopyOp arrays as int64 [num_ops, 3] (src, dst, nbytes)");

void bind_kernels(py::module_& m) {
  m.attr("COPY_OP_WORDS") = 3;
  m.def(
      "block_copy_host",
      [](uintptr_t ops, size_t num_ops, int num_threads) {
        EPDRT_ASSERT(num_ops == 0 || ops != 0, "block_copy_host: ops is null");
        py::gil_scoped_release release;
        block_copy_host(reinterpret_cast<const CopyOp*>(ops), num_ops, num_threads);
      },
      py::arg("ops"), py::arg("num_ops"), py::arg("num_threads") = 1,
      "Copies num_ops CopyOp (host memory at address `ops`: int64 [num_ops, 3] rows of\n"
      "src address, dst address, nbytes) with memcpy over up to num_threads threads.\n"
      "Synchronous; the GIL is released. Addresses are not checked: the caller validates.");
  m.def(
      "block_copy_cuda",
      [](uintptr_t ops_device, size_t num_ops, uintptr_t stream, uint64_t max_op_bytes) {
#ifdef EPDRT_WITH_CUDA
        block_copy_cuda(reinterpret_cast<const CopyOp*>(ops_device), num_ops,
                        reinterpret_cast<void*>(stream), max_op_bytes);
#else
        (void)ops_device, (void)num_ops, (void)stream, (void)max_op_bytes;
        throw CudaUnavailable("epdrt was built without CUDA (rebuild with EPDRT_CUDA=ON)");
#endif
      },
      py::arg("ops_device"), py::arg("num_ops"), py::arg("stream"),
      py::arg("max_op_bytes") = UINT64_MAX,
      "Launches one kernel on `stream` (a cudaStream_t, 0 = legacy default) copying num_ops\n"
      "CopyOp read from device memory at `ops_device` (int64 [num_ops, 3]). Asynchronous: the\n"
      "ops array and both buffers must stay alive until the stream passes this point.\n"
      "max_op_bytes: an upper bound on every op's nbytes (sizes the grid).");
  m.def(
      "kv_scatter_host",
      [](uintptr_t key, int64_t key_stride_layer, int64_t key_stride_token, uintptr_t value,
         int64_t value_stride_layer, int64_t value_stride_token, uintptr_t cache,
         int64_t cache_stride_block, int64_t cache_stride_layer, int64_t cache_stride_kv,
         int64_t cache_stride_token, uintptr_t slots, bool slots_int64, int64_t num_tokens,
         int num_layers, int block_size, size_t row_bytes) {
        const KvScatterArgs args{reinterpret_cast<const void*>(key),
                                 key_stride_layer,
                                 key_stride_token,
                                 reinterpret_cast<const void*>(value),
                                 value_stride_layer,
                                 value_stride_token,
                                 reinterpret_cast<void*>(cache),
                                 cache_stride_block,
                                 cache_stride_layer,
                                 cache_stride_kv,
                                 cache_stride_token,
                                 reinterpret_cast<const void*>(slots),
                                 slots_int64,
                                 num_tokens,
                                 num_layers,
                                 block_size,
                                 row_bytes};
        kv_scatter_host(args);
      },
      py::arg("key"), py::arg("key_stride_layer"), py::arg("key_stride_token"), py::arg("value"),
      py::arg("value_stride_layer"), py::arg("value_stride_token"), py::arg("cache"),
      py::arg("cache_stride_block"), py::arg("cache_stride_layer"), py::arg("cache_stride_kv"),
      py::arg("cache_stride_token"), py::arg("slots"), py::arg("slots_int64"),
      py::arg("num_tokens"), py::arg("num_layers"), py::arg("block_size"), py::arg("row_bytes"),
      "Writes token i's K and V rows (row_bytes each, every layer) into cache slot slots[i]\n"
      "(host addresses; strides in bytes). Synchronous. Nothing is checked: the caller\n"
      "validates (epdrt.kernels.kv_scatter).");
  m.def(
      "paged_decode_host",
      [](uintptr_t query, int64_t query_stride_seq, int64_t query_stride_head, uintptr_t kv,
         int64_t kv_stride_block, int64_t kv_stride_kv, int64_t kv_stride_token,
         int64_t kv_stride_head, uintptr_t block_tables, int64_t table_stride,
         uintptr_t context_lens, uintptr_t out, int batch, int num_heads, int num_kv_heads,
         int head_dim, int block_size, float scale, int type, int num_threads) {
        EPDRT_ASSERT(type >= 0 && type <= 2, "paged_decode_host: unknown float type ", type);
        const PagedDecodeArgs args{reinterpret_cast<const void*>(query),
                                   query_stride_seq,
                                   query_stride_head,
                                   reinterpret_cast<const void*>(kv),
                                   kv_stride_block,
                                   kv_stride_kv,
                                   kv_stride_token,
                                   kv_stride_head,
                                   reinterpret_cast<const int32_t*>(block_tables),
                                   table_stride,
                                   reinterpret_cast<const int32_t*>(context_lens),
                                   reinterpret_cast<void*>(out),
                                   batch,
                                   num_heads,
                                   num_kv_heads,
                                   head_dim,
                                   block_size,
                                   scale,
                                   static_cast<FloatType>(type)};
        py::gil_scoped_release release;
        paged_decode_host(args, num_threads);
      },
      py::arg("query"), py::arg("query_stride_seq"), py::arg("query_stride_head"), py::arg("kv"),
      py::arg("kv_stride_block"), py::arg("kv_stride_kv"), py::arg("kv_stride_token"),
      py::arg("kv_stride_head"), py::arg("block_tables"), py::arg("table_stride"),
      py::arg("context_lens"), py::arg("out"), py::arg("batch"), py::arg("num_heads"),
      py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("block_size"), py::arg("scale"),
      py::arg("type"), py::arg("num_threads") = 1,
      "Paged decode attention on host memory (addresses; strides in elements; type 0 fp32,\n"
      "1 fp16, 2 bf16): one query per sequence over its context_lens[s] tokens, read from the\n"
      "pages in place. Synchronous; the GIL is released. Nothing is checked: the caller\n"
      "validates (epdrt.kernels.paged_attention_decode).");
}

}  // namespace epdrt::bindings
