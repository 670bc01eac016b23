/* SPDX-License-Identifier: Apache-2.0 */
/* Uses libepdrt through its C header only: block pool semantics and a CPU region round trip.
 * Exits non-zero, naming the failed check, on any mismatch. */
#include <epdrt/epdrt.h>
#include <stdio.h>
#include <string.h>

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

int main(void) {
  printf("epdrt %s (cuda compiled: %d)\n", epdrt_version(), epdrt_cuda_compiled());
  test_block_pool();
  test_lookup_many();
  test_lookup_sizes();
  test_region();
  if (failures) {
    fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  printf("all C API checks passed\n");
  return 0;
}
