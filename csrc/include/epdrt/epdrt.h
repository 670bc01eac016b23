/* SPDX-License-Identifier: Apache-2.0 */
/* epdrt C API: block pools and memory regions for runtimes that do not use Python.
 *
 * Conventions: every function that can fail returns an epdrt_status; on failure nothing was
 * changed and epdrt_last_error() returns a message for the calling thread. Objects are owned by
 * the caller and released with the matching *_destroy function. Thread-safe per object. */
#ifndef EPDRT_EPDRT_H_
#define EPDRT_EPDRT_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define EPDRT_API __attribute__((visibility("default")))

typedef enum epdrt_status {
  EPDRT_OK = 0,
  EPDRT_ERR_INVALID_ARGUMENT = 1,
  EPDRT_ERR_POOL_EXHAUSTED = 2,
  EPDRT_ERR_CUDA_UNAVAILABLE = 3,
  EPDRT_ERR_SYSTEM = 4,
  EPDRT_ERR_INTERNAL = 5
} epdrt_status;

typedef enum epdrt_device_type { EPDRT_DEVICE_CPU = 0, EPDRT_DEVICE_CUDA = 1 } epdrt_device_type;

/* Library version string ("major.minor.patch") and whether it was compiled with CUDA. */
EPDRT_API const char* epdrt_version(void);
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
/* Releases this handle; the memory is freed when the last process unmaps it. */
EPDRT_API void epdrt_region_destroy(epdrt_region* region);

#ifdef __cplusplus
}
#endif

#endif /* EPDRT_EPDRT_H_ */
