// SPDX-License-Identifier: Apache-2.0
// C API: thin wrappers that turn C++ exceptions into status codes.
#include <algorithm>
#include <exception>
#include <memory>
#include <string>

#include "epdrt/block_pool.h"
#include "epdrt/common.h"
#include "epdrt/epdrt.h"
#include "epdrt/region.h"
#include "epdrt/transfer_engine.h"

struct epdrt_block_pool {
  explicit epdrt_block_pool(int32_t num_blocks) : pool(num_blocks) {}
  epdrt::BlockPool pool;
};

struct epdrt_region {
  std::shared_ptr<epdrt::Region> region;
};

struct epdrt_transfer_engine {
  explicit epdrt_transfer_engine(int32_t num_threads) : engine(num_threads) {}
  epdrt::TransferEngine engine;
};

struct epdrt_transfer {
  std::shared_ptr<epdrt::Transfer> transfer;
};

static_assert(EPDRT_REGION_DESCRIPTOR_BYTES == epdrt::Region::kDescriptorBytes,
              "C header and core disagree on the descriptor size");

// Every core status has its value in the C header.
#define EPDRT_SAME_STATUS(c, core) \
  static_assert(static_cast<int>(c) == static_cast<int>(epdrt::Status::core), #c)
EPDRT_SAME_STATUS(EPDRT_OK, kOk);
EPDRT_SAME_STATUS(EPDRT_ERR_INVALID_ARGUMENT, kInvalidArgument);
EPDRT_SAME_STATUS(EPDRT_ERR_POOL_EXHAUSTED, kPoolExhausted);
EPDRT_SAME_STATUS(EPDRT_ERR_CUDA_UNAVAILABLE, kCudaUnavailable);
EPDRT_SAME_STATUS(EPDRT_ERR_SYSTEM, kSystemError);
EPDRT_SAME_STATUS(EPDRT_ERR_INTERNAL, kInternal);
EPDRT_SAME_STATUS(EPDRT_ERR_TRANSFER_FAILED, kTransferFailed);
#undef EPDRT_SAME_STATUS
static_assert(
    static_cast<int>(EPDRT_TRANSFER_PENDING) == static_cast<int>(epdrt::TransferState::kPending) &&
        static_cast<int>(EPDRT_TRANSFER_DONE) == static_cast<int>(epdrt::TransferState::kDone) &&
        static_cast<int>(EPDRT_TRANSFER_FAILED) == static_cast<int>(epdrt::TransferState::kFailed),
    "C header and core disagree on the transfer states");

namespace {

// Set only on failure: a successful call touches no thread-local state (in a shared library
// that is a __tls_get_addr call, comparable to a whole block-pool operation).
thread_local std::string last_error;

template <typename Fn>
epdrt_status guarded(Fn&& fn) {
  try {
    fn();
    return EPDRT_OK;
  } catch (const epdrt::Error& e) {
    last_error = e.what();
    return static_cast<epdrt_status>(e.status());
  } catch (const std::exception& e) {
    last_error = e.what();
    return EPDRT_ERR_INTERNAL;
  }
}

// epdrt_block_pool_lookup with every argument checked (its hot path checks them inline and
// comes here only when one is bad, for the error and its message).
EPDRT_COLD epdrt_status lookup_guarded(epdrt_block_pool* pool, const void* key, size_t key_size,
                                       int32_t* out_id) {
  return guarded([&] {
    EPDRT_ASSERT(pool != nullptr && key != nullptr && out_id != nullptr, "NULL argument");
    epdrt::BlockKey::check_size(key_size);
    pool->pool.lookup_into(key, key_size, out_id);
  });
}

}  // namespace

extern "C" {

const char* epdrt_version(void) { return EPDRT_VERSION; }

int epdrt_api_version(void) { return EPDRT_API_VERSION; }

int epdrt_cuda_compiled(void) { return epdrt::cuda_compiled() ? 1 : 0; }

const char* epdrt_last_error(void) { return last_error.c_str(); }

epdrt_status epdrt_block_pool_create(int32_t num_blocks, epdrt_block_pool** out) {
  return guarded([&] {
    EPDRT_ASSERT(out != nullptr, "out must not be NULL");
    *out = new epdrt_block_pool(num_blocks);
  });
}

void epdrt_block_pool_destroy(epdrt_block_pool* pool) { delete pool; }

epdrt_status epdrt_block_pool_allocate(epdrt_block_pool* pool, int32_t n, int32_t* out_ids) {
  return guarded([&] {
    EPDRT_ASSERT(pool != nullptr && (n == 0 || out_ids != nullptr), "NULL argument");
    pool->pool.allocate(n, out_ids);
  });
}

epdrt_status epdrt_block_pool_free(epdrt_block_pool* pool, const int32_t* ids, size_t n) {
  return guarded([&] {
    EPDRT_ASSERT(pool != nullptr && (n == 0 || ids != nullptr), "NULL argument");
    pool->pool.free(ids, n);
  });
}

epdrt_status epdrt_block_pool_incref(epdrt_block_pool* pool, const int32_t* ids, size_t n) {
  return guarded([&] {
    EPDRT_ASSERT(pool != nullptr && (n == 0 || ids != nullptr), "NULL argument");
    pool->pool.incref(ids, n);
  });
}

epdrt_status epdrt_block_pool_commit(epdrt_block_pool* pool, int32_t id, const void* key,
                                     size_t key_size, int* out_committed) {
  return guarded([&] {
    EPDRT_ASSERT(pool != nullptr && key != nullptr, "NULL argument");
    const bool committed = pool->pool.commit(id, epdrt::BlockKey::from_bytes(key, key_size));
    if (out_committed != nullptr) *out_committed = committed ? 1 : 0;
  });
}

epdrt_status epdrt_block_pool_lookup(epdrt_block_pool* pool, const void* key, size_t key_size,
                                     int32_t* out_id) {
  // The hot path has no exception frame: arguments that would make the pool throw are
  // reported out of line, by the guarded call.
  if (pool == nullptr || key == nullptr || out_id == nullptr ||
      !epdrt::BlockKey::valid_size(key_size)) {
    return lookup_guarded(pool, key, key_size, out_id);
  }
  pool->pool.lookup_into(key, key_size, out_id);
  return EPDRT_OK;
}

epdrt_status epdrt_block_pool_lookup_many(epdrt_block_pool* pool, const void* keys, size_t key_size,
                                          size_t n, int32_t* out_ids) {
  return guarded([&] {
    EPDRT_ASSERT(pool != nullptr && (n == 0 || (keys != nullptr && out_ids != nullptr)),
                 "NULL argument");
    pool->pool.lookup_many(keys, key_size, n, out_ids);
  });
}

epdrt_status epdrt_block_pool_stats_get(const epdrt_block_pool* pool, epdrt_block_pool_stats* out) {
  return guarded([&] {
    EPDRT_ASSERT(pool != nullptr && out != nullptr, "NULL argument");
    const epdrt::BlockPoolStats s = pool->pool.stats();
    *out = {s.num_blocks, s.num_free, s.num_cached, s.hits, s.misses, s.evictions};
  });
}

epdrt_status epdrt_region_create(uint64_t nbytes, epdrt_device_type type, int32_t device_index,
                                 epdrt_region** out) {
  return guarded([&] {
    EPDRT_ASSERT(out != nullptr, "out must not be NULL");
    const epdrt::Device device{static_cast<epdrt::DeviceType>(type), device_index};
    *out = new epdrt_region{epdrt::Region::create(nbytes, device)};
  });
}

epdrt_status epdrt_region_open(const void* descriptor, size_t size, epdrt_region** out) {
  return guarded([&] {
    EPDRT_ASSERT(descriptor != nullptr && out != nullptr, "NULL argument");
    *out = new epdrt_region{epdrt::Region::open(static_cast<const uint8_t*>(descriptor), size)};
  });
}

epdrt_status epdrt_region_export(const epdrt_region* region, void* out) {
  return guarded([&] {
    EPDRT_ASSERT(region != nullptr && out != nullptr, "NULL argument");
    const std::vector<uint8_t> desc = region->region->export_descriptor();
    std::copy(desc.begin(), desc.end(), static_cast<uint8_t*>(out));
  });
}

void* epdrt_region_data(const epdrt_region* region) {
  return region != nullptr ? region->region->data() : nullptr;
}

uint64_t epdrt_region_nbytes(const epdrt_region* region) {
  return region != nullptr ? region->region->nbytes() : 0;
}

epdrt_status epdrt_region_close(epdrt_region* region) {
  return guarded([&] {
    EPDRT_ASSERT(region != nullptr, "region must not be NULL");
    region->region->close();
  });
}

void epdrt_region_destroy(epdrt_region* region) { delete region; }

epdrt_status epdrt_transfer_engine_create(int32_t num_threads, epdrt_transfer_engine** out) {
  return guarded([&] {
    EPDRT_ASSERT(out != nullptr, "out must not be NULL");
    *out = new epdrt_transfer_engine(num_threads);
  });
}

void epdrt_transfer_engine_destroy(epdrt_transfer_engine* engine) { delete engine; }

int epdrt_transfer_engine_completion_fd(const epdrt_transfer_engine* engine) {
  return engine != nullptr ? engine->engine.completion_fd() : -1;
}

epdrt_status epdrt_transfer_submit_blocks(epdrt_transfer_engine* engine, epdrt_region* src,
                                          epdrt_region* dst, const int32_t* src_blocks,
                                          const int32_t* dst_blocks, size_t n,
                                          uint64_t block_nbytes, epdrt_transfer** out) {
  return guarded([&] {
    EPDRT_ASSERT(engine != nullptr && src != nullptr && dst != nullptr && out != nullptr &&
                     (n == 0 || (src_blocks != nullptr && dst_blocks != nullptr)),
                 "NULL argument");
    EPDRT_ASSERT(block_nbytes > 0, "block_nbytes must be positive");
    std::vector<uint64_t> offsets(2 * n);
    for (size_t i = 0; i < n; ++i) {
      EPDRT_ASSERT(src_blocks[i] >= 0 && dst_blocks[i] >= 0, "block ", i, " has a negative id");
      offsets[i] = static_cast<uint64_t>(src_blocks[i]) * block_nbytes;
      offsets[n + i] = static_cast<uint64_t>(dst_blocks[i]) * block_nbytes;
    }
    auto t = engine->engine.submit_blocks(src->region, dst->region, offsets.data(),
                                          offsets.data() + n, nullptr, block_nbytes, n);
    *out = new epdrt_transfer{std::move(t)};
  });
}

epdrt_status epdrt_transfer_submit(epdrt_transfer_engine* engine, epdrt_region* src,
                                   epdrt_region* dst, const uint64_t* src_offsets,
                                   const uint64_t* dst_offsets, const uint64_t* sizes,
                                   uint64_t uniform_nbytes, size_t n, epdrt_transfer** out) {
  return guarded([&] {
    EPDRT_ASSERT(engine != nullptr && src != nullptr && dst != nullptr && out != nullptr &&
                     (n == 0 || (src_offsets != nullptr && dst_offsets != nullptr)),
                 "NULL argument");
    auto t = engine->engine.submit_blocks(src->region, dst->region, src_offsets, dst_offsets, sizes,
                                          uniform_nbytes, n);
    *out = new epdrt_transfer{std::move(t)};
  });
}

epdrt_status epdrt_transfer_poll(epdrt_transfer* transfer, epdrt_transfer_state* out) {
  return guarded([&] {
    EPDRT_ASSERT(transfer != nullptr && out != nullptr, "NULL argument");
    *out = static_cast<epdrt_transfer_state>(transfer->transfer->state());
  });
}

epdrt_status epdrt_transfer_wait(epdrt_transfer* transfer, double timeout_s,
                                 epdrt_transfer_state* out) {
  return guarded([&] {
    EPDRT_ASSERT(transfer != nullptr && out != nullptr, "NULL argument");
    const epdrt::TransferState state = transfer->transfer->wait(timeout_s);
    *out = static_cast<epdrt_transfer_state>(state);
    if (state == epdrt::TransferState::kFailed) {
      throw epdrt::TransferFailed(transfer->transfer->error());
    }
  });
}

uint64_t epdrt_transfer_nbytes(const epdrt_transfer* transfer) {
  return transfer != nullptr ? transfer->transfer->nbytes() : 0;
}

void epdrt_transfer_destroy(epdrt_transfer* transfer) { delete transfer; }

}  // extern "C"
