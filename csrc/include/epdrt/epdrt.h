/* SPDX-License-Identifier: Apache-2.0 */
/* epdrt C API: block pools, memory regions and the transfer engine for runtimes that do not
 * use Python.
 *
 * Conventions: every function that can fail returns an epdrt_status; on failure nothing was
 * changed and epdrt_last_error() returns a message for the calling thread. A NULL handle is an
 * EPDRT_ERR_INVALID_ARGUMENT (accessors return NULL or 0; *_destroy ignores it). Objects are
 * owned by the caller and released with the matching *_destroy function. Thread-safe per
 * object. */
#ifndef EPDRT_EPDRT_H_
#define EPDRT_EPDRT_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define EPDRT_API __attribute__((visibility("default")))

/* The API this header declares; epdrt_api_version() is the library's (equal when they match). */
#define EPDRT_API_VERSION 2

typedef enum epdrt_status {
  EPDRT_OK = 0,
  EPDRT_ERR_INVALID_ARGUMENT = 1,
  EPDRT_ERR_POOL_EXHAUSTED = 2,
  EPDRT_ERR_CUDA_UNAVAILABLE = 3,
  EPDRT_ERR_SYSTEM = 4,
  EPDRT_ERR_INTERNAL = 5,
  EPDRT_ERR_TRANSFER_FAILED = 6 /* a transfer's copies failed after it was submitted */
} epdrt_status;

typedef enum epdrt_device_type { EPDRT_DEVICE_CPU = 0, EPDRT_DEVICE_CUDA = 1 } epdrt_device_type;

/* Library version string ("major.minor.patch") and whether it was compiled with CUDA. */
EPDRT_API const char* epdrt_version(void);
EPDRT_API int epdrt_api_version(void);
EPDRT_API int epdrt_cuda_compiled(void);
/* Message of the last failed call on this thread ("" if none has failed). Successful calls
 * leave it as it was; valid until the next failed call on this thread. */
EPDRT_API const char* epdrt_last_error(void);

/* ---- block pool: ids in [0, num_blocks), refcounts, LRU free queue, content keys ---- */
typedef struct epdrt_block_pool epdrt_block_pool;

typedef struct epdrt_block_pool_stats {
  int32_t num_blocks;
  int32_t num_free;   /* reference count 0 */
  int32_t num_cached; /* free and still holding a content key */
  uint64_t hits;
  uint64_t misses;
  uint64_t evictions;
} epdrt_block_pool_stats;

EPDRT_API epdrt_status epdrt_block_pool_create(int32_t num_blocks, epdrt_block_pool** out);
EPDRT_API void epdrt_block_pool_destroy(epdrt_block_pool* pool);
/* Writes n ids to out_ids (room for n); all or nothing (EPDRT_ERR_POOL_EXHAUSTED). */
EPDRT_API epdrt_status epdrt_block_pool_allocate(epdrt_block_pool* pool, int32_t n,
                                                 int32_t* out_ids);
EPDRT_API epdrt_status epdrt_block_pool_free(epdrt_block_pool* pool, const int32_t* ids, size_t n);
EPDRT_API epdrt_status epdrt_block_pool_incref(epdrt_block_pool* pool, const int32_t* ids,
                                               size_t n);
/* key: 1..64 opaque bytes. *out_committed = 0 when another block already holds the key. */
EPDRT_API epdrt_status epdrt_block_pool_commit(epdrt_block_pool* pool, int32_t id, const void* key,
                                               size_t key_size, int* out_committed);
/* *out_id = the block holding key, with one more reference; -1 when no block holds it. */
EPDRT_API epdrt_status epdrt_block_pool_lookup(epdrt_block_pool* pool, const void* key,
                                               size_t key_size, int32_t* out_id);
/* lookup() of n keys of key_size bytes each, stored back to back in keys; out_ids[i] is the
 * block (one more reference) or -1. Checks every key's size before looking any up. */
EPDRT_API epdrt_status epdrt_block_pool_lookup_many(epdrt_block_pool* pool, const void* keys,
                                                    size_t key_size, size_t n, int32_t* out_ids);
EPDRT_API epdrt_status epdrt_block_pool_stats_get(const epdrt_block_pool* pool,
                                                  epdrt_block_pool_stats* out);

/* ---- memory regions: one arena, shareable with other processes by a descriptor ---- */
typedef struct epdrt_region epdrt_region;

/* Descriptor format "EPDRTRG2": it names a CUDA region's device by UUID, so processes with
 * different CUDA_VISIBLE_DEVICES agree on it. */
#define EPDRT_REGION_DESCRIPTOR_BYTES 120

EPDRT_API epdrt_status epdrt_region_create(uint64_t nbytes, epdrt_device_type type,
                                           int32_t device_index, epdrt_region** out);
/* Maps a peer's region. A CUDA region is mapped on the calling thread's current device when it
 * can reach the memory (the same device or peer access), else on the device that holds it. */
EPDRT_API epdrt_status epdrt_region_open(const void* descriptor, size_t size, epdrt_region** out);
/* Writes EPDRT_REGION_DESCRIPTOR_BYTES bytes to out (room for that many). */
EPDRT_API epdrt_status epdrt_region_export(const epdrt_region* region, void* out);
EPDRT_API void* epdrt_region_data(const epdrt_region* region);
EPDRT_API uint64_t epdrt_region_nbytes(const epdrt_region* region);
/* Stops the region from being used for new transfers or exported (a creator's CPU region can
 * no longer be opened by peers); its memory stays mapped until the handle is destroyed, and
 * transfers already submitted finish. */
EPDRT_API epdrt_status epdrt_region_close(epdrt_region* region);
/* Releases this handle; the memory is freed when the last process unmaps it. */
EPDRT_API void epdrt_region_destroy(epdrt_region* region);

/* ---- transfer engine: batched asynchronous copies between regions ---- */
typedef struct epdrt_transfer_engine epdrt_transfer_engine;
typedef struct epdrt_transfer epdrt_transfer;

typedef enum epdrt_transfer_state {
  EPDRT_TRANSFER_PENDING = 0,
  EPDRT_TRANSFER_DONE = 1,
  EPDRT_TRANSFER_FAILED = 2
} epdrt_transfer_state;

/* num_threads: CPU copy threads (<= 0: min(4, hardware threads)). Destroying the engine
 * finishes every copy already submitted. */
EPDRT_API epdrt_status epdrt_transfer_engine_create(int32_t num_threads,
                                                    epdrt_transfer_engine** out);
EPDRT_API void epdrt_transfer_engine_destroy(epdrt_transfer_engine* engine);
/* A non-blocking eventfd, incremented each time one of the engine's transfers ends: poll it to
 * wait for many at once (owned by the engine; -1 for a NULL engine). */
EPDRT_API int epdrt_transfer_engine_completion_fd(const epdrt_transfer_engine* engine);

/* Copies whole blocks between two block-structured regions: block src_blocks[i] of src (bytes
 * [id * block_nbytes, (id + 1) * block_nbytes)) to block dst_blocks[i] of dst, for i < n.
 * Adjacent blocks are coalesced into one copy. All or nothing: an id out of a region's bounds,
 * a closed region, or overlapping destinations reject the whole transfer, nothing copied. */
EPDRT_API epdrt_status epdrt_transfer_submit_blocks(epdrt_transfer_engine* engine,
                                                    epdrt_region* src, epdrt_region* dst,
                                                    const int32_t* src_blocks,
                                                    const int32_t* dst_blocks, size_t n,
                                                    uint64_t block_nbytes, epdrt_transfer** out);
/* n copies of sizes[i] bytes (or uniform_nbytes each when sizes is NULL) from
 * src[src_offsets[i]] to dst[dst_offsets[i]]; the same checks as submit_blocks. */
EPDRT_API epdrt_status epdrt_transfer_submit(epdrt_transfer_engine* engine, epdrt_region* src,
                                             epdrt_region* dst, const uint64_t* src_offsets,
                                             const uint64_t* dst_offsets, const uint64_t* sizes,
                                             uint64_t uniform_nbytes, size_t n,
                                             epdrt_transfer** out);
/* The transfer's state now, without blocking. */
EPDRT_API epdrt_status epdrt_transfer_poll(epdrt_transfer* transfer, epdrt_transfer_state* out);
/* Blocks until the transfer ends or timeout_s passes (negative: no limit); *out is
 * EPDRT_TRANSFER_PENDING after a timeout. A failed transfer returns EPDRT_ERR_TRANSFER_FAILED
 * (epdrt_last_error() says why) with *out EPDRT_TRANSFER_FAILED. */
EPDRT_API epdrt_status epdrt_transfer_wait(epdrt_transfer* transfer, double timeout_s,
                                           epdrt_transfer_state* out);
/* Bytes the transfer copies (0 for NULL). */
EPDRT_API uint64_t epdrt_transfer_nbytes(const epdrt_transfer* transfer);
/* Releases the handle; a pending transfer still completes (the engine keeps its regions). */
EPDRT_API void epdrt_transfer_destroy(epdrt_transfer* transfer);

#ifdef __cplusplus
}
#endif

#endif /* EPDRT_EPDRT_H_ */
