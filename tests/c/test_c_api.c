/* SPDX-License-Identifier: Apache-2.0 */
/* Uses libepdrt through its C header only: block pool semantics, a CPU region round trip, and
 * block transfers between regions (bytes checked end to end). Exits non-zero, naming the failed
 * check, on any mismatch. */
#include <epdrt/epdrt.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static int failures = 0;

#define CHECK(cond)                                                                            \
  do {                                                                                         \
    if (!(cond)) {                                                                             \
      fprintf(stderr, "%s:%d: CHECK(%s) failed (last error: %s)\n", __FILE__, __LINE__, #cond, \
              epdrt_last_error());                                                             \
      ++failures;                                                                              \
    }                                                                                          \
  } while (0)

static void test_block_pool(void) {
  epdrt_block_pool* pool = NULL;
  CHECK(epdrt_block_pool_create(0, &pool) == EPDRT_ERR_INVALID_ARGUMENT);
  CHECK(strlen(epdrt_last_error()) > 0);
  CHECK(epdrt_block_pool_create(4, &pool) == EPDRT_OK);

  int32_t ids[4];
  CHECK(epdrt_block_pool_allocate(pool, 3, ids) == EPDRT_OK);
  CHECK(ids[0] == 0 && ids[1] == 1 && ids[2] == 2);
  CHECK(epdrt_block_pool_allocate(pool, 2, ids + 3) == EPDRT_ERR_POOL_EXHAUSTED);

  const char key[] = "0123456789abcdef";
  int committed = -1;
  CHECK(epdrt_block_pool_commit(pool, ids[1], key, 16, &committed) == EPDRT_OK && committed == 1);
  CHECK(epdrt_block_pool_commit(pool, ids[2], key, 16, &committed) == EPDRT_OK && committed == 0);
  CHECK(epdrt_block_pool_free(pool, ids, 3) == EPDRT_OK);
  const int32_t bad = 7;
  CHECK(epdrt_block_pool_free(pool, &bad, 1) == EPDRT_ERR_INVALID_ARGUMENT);

  epdrt_block_pool_stats stats;
  CHECK(epdrt_block_pool_stats_get(pool, &stats) == EPDRT_OK);
  CHECK(stats.num_blocks == 4 && stats.num_free == 4 && stats.num_cached == 1);

  int32_t found = -2;
  CHECK(epdrt_block_pool_lookup(pool, key, 16, &found) == EPDRT_OK && found == ids[1]);
  CHECK(epdrt_block_pool_lookup(pool, "nope", 4, &found) == EPDRT_OK && found == -1);
  /* Bad arguments are reported and count as no lookup. */
  found = -2;
  CHECK(epdrt_block_pool_lookup(pool, key, 0, &found) == EPDRT_ERR_INVALID_ARGUMENT);
  CHECK(strstr(epdrt_last_error(), "bytes") != NULL && found == -2);
  CHECK(epdrt_block_pool_lookup(pool, key, 65, &found) == EPDRT_ERR_INVALID_ARGUMENT);
  CHECK(epdrt_block_pool_lookup(pool, NULL, 16, &found) == EPDRT_ERR_INVALID_ARGUMENT);
  CHECK(epdrt_block_pool_lookup(pool, key, 16, NULL) == EPDRT_ERR_INVALID_ARGUMENT);
  CHECK(epdrt_block_pool_lookup(NULL, key, 16, &found) == EPDRT_ERR_INVALID_ARGUMENT);
  CHECK(strstr(epdrt_last_error(), "NULL") != NULL && found == -2);
  CHECK(epdrt_block_pool_stats_get(pool, &stats) == EPDRT_OK);
  CHECK(stats.hits == 1 && stats.misses == 1 && stats.num_free == 3);
  epdrt_block_pool_destroy(pool);
}

/* lookup_many over keys stored back to back: structured keys (counters, one byte apart) all
 * found, misses reported as -1, a bad key size rejected before any lookup. */
static void test_lookup_many(void) {
  enum { N = 1000, KEY = 12 };
  epdrt_block_pool* pool = NULL;
  CHECK(epdrt_block_pool_create(N, &pool) == EPDRT_OK);
  static int32_t ids[N], found[2 * N];
  static unsigned char keys[2 * N][KEY];
  memset(keys, 0, sizeof(keys));
  for (int i = 0; i < 2 * N; ++i) memcpy(keys[i], &i, sizeof(i)); /* keys N.. are never committed */
  CHECK(epdrt_block_pool_allocate(pool, N, ids) == EPDRT_OK);
  for (int i = 0; i < N; ++i)
    CHECK(epdrt_block_pool_commit(pool, ids[i], keys[i], KEY, NULL) == EPDRT_OK);
  CHECK(epdrt_block_pool_free(pool, ids, N) == EPDRT_OK);

  /* Read with a 13-byte stride, no stored key matches (sizes differ): all miss. */
  CHECK(epdrt_block_pool_lookup_many(pool, keys, KEY + 1, N, found) == EPDRT_OK);
  int all_missed = 1;
  for (int i = 0; i < N; ++i) all_missed &= found[i] == -1;
  CHECK(all_missed);

  CHECK(epdrt_block_pool_lookup_many(pool, keys, KEY, 2 * N, found) == EPDRT_OK);
  int exact = 1;
  for (int i = 0; i < 2 * N; ++i) exact &= found[i] == (i < N ? ids[i] : -1);
  CHECK(exact);
  epdrt_block_pool_stats stats;
  CHECK(epdrt_block_pool_stats_get(pool, &stats) == EPDRT_OK);
  CHECK(stats.num_free == 0 && stats.hits == N && stats.misses == 2 * N);

  CHECK(epdrt_block_pool_lookup_many(pool, keys, 0, 1, found) == EPDRT_ERR_INVALID_ARGUMENT);
  CHECK(epdrt_block_pool_lookup_many(pool, keys, 65, 1, found) == EPDRT_ERR_INVALID_ARGUMENT);
  /* The failed calls changed nothing, and the message survives a later successful call. */
  CHECK(epdrt_block_pool_stats_get(pool, &stats) == EPDRT_OK);
  CHECK(stats.num_free == 0 && stats.hits == N && stats.misses == 2 * N);
  CHECK(strstr(epdrt_last_error(), "bytes") != NULL);
  epdrt_block_pool_destroy(pool);
}

/* A key of size bytes: 0xab filler, then counter (16 bits, little-endian) in its last two. */
static void counter_key(unsigned char* key, size_t size, int counter) {
  memset(key, 0xab, size);
  key[size - 2] = (unsigned char)counter;
  key[size - 1] = (unsigned char)(counter >> 8);
}

/* Single-key lookups of every block of a full pool (the index at its fullest: long probe runs)
 * for key sizes around the word boundaries and the 32-byte digest size: each key finds its own
 * block, a key one counter byte apart misses, and the counters agree. */
static void test_lookup_sizes(void) {
  enum { N = 512, MAX_KEY = 64 };
  static const size_t sizes[] = {2, 7, 8, 9, 16, 24, 31, 32, 33, 40, 63, 64};
  int32_t ids[N];
  unsigned char key[MAX_KEY];
  for (size_t s = 0; s < sizeof(sizes) / sizeof(sizes[0]); ++s) {
    const size_t size = sizes[s];
    epdrt_block_pool* pool = NULL;
    CHECK(epdrt_block_pool_create(N, &pool) == EPDRT_OK);
    CHECK(epdrt_block_pool_allocate(pool, N, ids) == EPDRT_OK);
    for (int i = 0; i < N; ++i) {
      counter_key(key, size, i);
      CHECK(epdrt_block_pool_commit(pool, ids[i], key, size, NULL) == EPDRT_OK);
    }
    CHECK(epdrt_block_pool_free(pool, ids, N) == EPDRT_OK);
    int exact = 1;
    for (int i = 0; i < N; ++i) {
      int32_t found = -2;
      counter_key(key, size, i);
      CHECK(epdrt_block_pool_lookup(pool, key, size, &found) == EPDRT_OK);
      exact &= found == ids[i];
      if (found >= 0) CHECK(epdrt_block_pool_free(pool, &found, 1) == EPDRT_OK);
      counter_key(key, size, i + N); /* never committed */
      CHECK(epdrt_block_pool_lookup(pool, key, size, &found) == EPDRT_OK);
      exact &= found == -1;
    }
    if (!exact) fprintf(stderr, "single-key lookups of %zu-byte keys went wrong\n", size);
    CHECK(exact);
    epdrt_block_pool_stats stats;
    CHECK(epdrt_block_pool_stats_get(pool, &stats) == EPDRT_OK);
    CHECK(stats.hits == N && stats.misses == N && stats.num_free == N && stats.num_cached == N);
    epdrt_block_pool_destroy(pool);
  }
}

static void test_region(void) {
  epdrt_region* region = NULL;
  CHECK(epdrt_region_create(1 << 16, EPDRT_DEVICE_CPU, 0, &region) == EPDRT_OK);
  CHECK(epdrt_region_nbytes(region) == 1 << 16);
  unsigned char desc[EPDRT_REGION_DESCRIPTOR_BYTES];
  CHECK(epdrt_region_export(region, desc) == EPDRT_OK);
  CHECK(EPDRT_REGION_DESCRIPTOR_BYTES == 120 && memcmp(desc, "EPDRTRG2", 8) == 0);

  epdrt_region* peer = NULL;
  CHECK(epdrt_region_open(desc, sizeof(desc), &peer) == EPDRT_OK);
  memcpy(epdrt_region_data(region), "epdrt", 6);
  CHECK(strcmp((const char*)epdrt_region_data(peer), "epdrt") == 0);
  CHECK(epdrt_region_open(desc, 3, &peer) == EPDRT_ERR_INVALID_ARGUMENT);
  epdrt_region_destroy(peer);
  epdrt_region_destroy(region);

  if (!epdrt_cuda_compiled()) {
    CHECK(epdrt_region_create(1024, EPDRT_DEVICE_CUDA, 0, &region) == EPDRT_ERR_CUDA_UNAVAILABLE);
  }
}

enum { BLOCK = 4096, BLOCKS = 16 };

/* FNV-1a of n bytes. */
static uint64_t checksum(const unsigned char* p, size_t n) {
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

static unsigned char* block_of(epdrt_region* r, int32_t id) {
  return (unsigned char*)epdrt_region_data(r) + (size_t)id * BLOCK;
}

/* Blocks between a region and a peer's handle to another (opened from its descriptor, as
 * another process would): scattered and adjacent ids, the completion fd, and every rejected
 * submit leaving the destination untouched. */
static void test_transfer(void) {
  epdrt_transfer_engine* engine = NULL;
  CHECK(epdrt_transfer_engine_create(2, &engine) == EPDRT_OK);
  const int fd = epdrt_transfer_engine_completion_fd(engine);
  CHECK(fd >= 0);
  epdrt_region *src = NULL, *dst = NULL, *peer = NULL;
  CHECK(epdrt_region_create(BLOCK * BLOCKS, EPDRT_DEVICE_CPU, 0, &src) == EPDRT_OK);
  CHECK(epdrt_region_create(BLOCK * BLOCKS, EPDRT_DEVICE_CPU, 0, &dst) == EPDRT_OK);
  unsigned char desc[EPDRT_REGION_DESCRIPTOR_BYTES];
  CHECK(epdrt_region_export(dst, desc) == EPDRT_OK);
  CHECK(epdrt_region_open(desc, sizeof(desc), &peer) == EPDRT_OK);
  for (int i = 0; i < BLOCK * BLOCKS; ++i) block_of(src, 0)[i] = (unsigned char)(i * 7 + i / 251);
  memset(epdrt_region_data(dst), 0, BLOCK * BLOCKS);

  /* 3 -> 0, then the adjacent run 5, 6, 7 -> 9, 10, 11 (coalesced into one copy). */
  const int32_t from[] = {3, 5, 6, 7}, to[] = {0, 9, 10, 11};
  epdrt_transfer* t = NULL;
  CHECK(epdrt_transfer_submit_blocks(engine, src, peer, from, to, 4, BLOCK, &t) == EPDRT_OK);
  epdrt_transfer_state state = EPDRT_TRANSFER_PENDING;
  CHECK(epdrt_transfer_wait(t, 10.0, &state) == EPDRT_OK && state == EPDRT_TRANSFER_DONE);
  CHECK(epdrt_transfer_poll(t, &state) == EPDRT_OK && state == EPDRT_TRANSFER_DONE);
  CHECK(epdrt_transfer_nbytes(t) == 4 * BLOCK);
  epdrt_transfer_destroy(t);
  for (int i = 0; i < 4; ++i) {
    CHECK(checksum(block_of(dst, to[i]), BLOCK) == checksum(block_of(src, from[i]), BLOCK));
  }
  struct pollfd pfd = {fd, POLLIN, 0};
  CHECK(poll(&pfd, 1, 1000) == 1 && (pfd.revents & POLLIN));
  uint64_t ended = 0;
  CHECK(read(fd, &ended, sizeof(ended)) == sizeof(ended) && ended >= 1);

  /* Byte ranges of any size. */
  const uint64_t so[] = {10, 5000}, dof[] = {BLOCK * 2 + 1, BLOCK * 3}, sizes[] = {100, 3000};
  CHECK(epdrt_transfer_submit(engine, src, dst, so, dof, sizes, 0, 2, &t) == EPDRT_OK);
  CHECK(epdrt_transfer_wait(t, 10.0, &state) == EPDRT_OK && state == EPDRT_TRANSFER_DONE);
  epdrt_transfer_destroy(t);
  CHECK(memcmp(block_of(dst, 2) + 1, block_of(src, 0) + 10, 100) == 0);
  CHECK(memcmp(block_of(dst, 3), block_of(src, 0) + 5000, 3000) == 0);

  /* Rejected, nothing copied: an id out of bounds, a negative one, overlapping destinations,
   * a closed region, NULL handles. */
  const uint64_t before = checksum(epdrt_region_data(dst), BLOCK * BLOCKS);
  const int32_t out_of_bounds[] = {BLOCKS}, negative[] = {-1}, twice[] = {4, 4}, two[] = {1, 2};
  t = NULL;
  CHECK(epdrt_transfer_submit_blocks(engine, src, dst, two, out_of_bounds, 1, BLOCK, &t) ==
        EPDRT_ERR_INVALID_ARGUMENT);
  CHECK(epdrt_transfer_submit_blocks(engine, src, dst, negative, two, 1, BLOCK, &t) ==
        EPDRT_ERR_INVALID_ARGUMENT);
  CHECK(epdrt_transfer_submit_blocks(engine, src, dst, two, twice, 2, BLOCK, &t) ==
        EPDRT_ERR_INVALID_ARGUMENT);
  CHECK(strstr(epdrt_last_error(), "overlap") != NULL);
  CHECK(epdrt_transfer_submit_blocks(NULL, src, dst, two, two, 1, BLOCK, &t) ==
        EPDRT_ERR_INVALID_ARGUMENT);
  CHECK(epdrt_transfer_submit_blocks(engine, src, NULL, two, two, 1, BLOCK, &t) ==
        EPDRT_ERR_INVALID_ARGUMENT);
  CHECK(epdrt_transfer_submit_blocks(engine, src, dst, two, two, 1, 0, &t) ==
        EPDRT_ERR_INVALID_ARGUMENT);
  CHECK(epdrt_region_close(peer) == EPDRT_OK);
  CHECK(epdrt_transfer_submit_blocks(engine, src, peer, two, two, 1, BLOCK, &t) ==
        EPDRT_ERR_INVALID_ARGUMENT);
  CHECK(t == NULL && checksum(epdrt_region_data(dst), BLOCK * BLOCKS) == before);
  CHECK(epdrt_transfer_poll(NULL, &state) == EPDRT_ERR_INVALID_ARGUMENT);
  CHECK(epdrt_transfer_wait(NULL, 1.0, &state) == EPDRT_ERR_INVALID_ARGUMENT);
  CHECK(epdrt_region_close(NULL) == EPDRT_ERR_INVALID_ARGUMENT);
  CHECK(epdrt_region_data(NULL) == NULL && epdrt_region_nbytes(NULL) == 0);
  CHECK(epdrt_transfer_engine_completion_fd(NULL) == -1 && epdrt_transfer_nbytes(NULL) == 0);
  epdrt_transfer_destroy(NULL);
  epdrt_region_destroy(peer);
  epdrt_region_destroy(dst);
  epdrt_region_destroy(src);
  epdrt_transfer_engine_destroy(engine);
  epdrt_transfer_engine_destroy(NULL);
}

int main(void) {
  printf("epdrt %s (cuda compiled: %d)\n", epdrt_version(), epdrt_cuda_compiled());
  test_block_pool();
  test_lookup_many();
  test_lookup_sizes();
  test_region();
  test_transfer();
  CHECK(epdrt_api_version() == EPDRT_API_VERSION);
  if (failures) {
    fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  printf("all C API checks passed\n");
  return 0;
}
