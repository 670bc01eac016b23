/* SPDX-License-Identifier: Apache-2.0 */
/* Native block-pool benchmark through the C API: the same cases as bench/block_pool.py.
 * Usage: block_pool_bench NUM_BLOCKS BLOCK_OPS REPEAT. Prints one JSON object per case with the
 * median seconds and the block operations done. */
#define _POSIX_C_SOURCE 199309L
#include <epdrt/epdrt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define BATCH 16
#define KEY_BYTES 32

static void check(epdrt_status s, const char* what) {
  if (s != EPDRT_OK) {
    fprintf(stderr, "%s failed: %s\n", what, epdrt_last_error());
    exit(1);
  }
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void* a, const void* b) {
  const double x = *(const double*)a, y = *(const double*)b;
  return (x > y) - (x < y);
}

/* Deterministic pseudo-random 32-byte keys (splitmix64). */
static void make_keys(unsigned char* keys, int n, unsigned long long seed) {
  for (int i = 0; i < n * KEY_BYTES; i += 8) {
    unsigned long long z = (seed += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    memcpy(keys + i, &z, 8);
  }
}

/* All blocks free; the first num_keys cached under keys. */
static epdrt_block_pool* prefilled(int num_blocks, const unsigned char* keys, int num_keys) {
  epdrt_block_pool* pool;
  check(epdrt_block_pool_create(num_blocks, &pool), "create");
  int32_t* ids = malloc(sizeof(int32_t) * (size_t)num_keys);
  check(epdrt_block_pool_allocate(pool, num_keys, ids), "allocate");
  for (int i = 0; i < num_keys; ++i) {
    check(epdrt_block_pool_commit(pool, ids[i], keys + (size_t)i * KEY_BYTES, KEY_BYTES, NULL),
          "commit");
  }
  check(epdrt_block_pool_free(pool, ids, (size_t)num_keys), "free");
  free(ids);
  return pool;
}

enum { ALLOC_FREE, LOOKUP_HIT, LOOKUP_MISS, COMMIT, LOOKUP_MANY_HIT, LOOKUP_MANY_MISS, NUM_CASES };
static const char* kNames[NUM_CASES] = {
    "allocate+free x16",        "lookup hit + free",          "lookup miss",
    "allocate+commit+free x16", "lookup_many hit + free x16", "lookup_many miss x16"};

static long run_case(int which, epdrt_block_pool* pool, long ops, const unsigned char* keys,
                     int num_keys, const unsigned char* missing) {
  int32_t ids[BATCH];
  long done = 0;
  if (which == ALLOC_FREE) {
    for (long i = 0; i < ops / (2 * BATCH); ++i) {
      check(epdrt_block_pool_allocate(pool, BATCH, ids), "allocate");
      check(epdrt_block_pool_free(pool, ids, BATCH), "free");
      done += 2 * BATCH;
    }
  } else if (which == LOOKUP_HIT) {
    for (long i = 0; i < ops / 2; ++i) {
      int32_t id;
      check(epdrt_block_pool_lookup(pool, keys + (size_t)(i & (num_keys - 1)) * KEY_BYTES,
                                    KEY_BYTES, &id),
            "lookup");
      check(epdrt_block_pool_free(pool, &id, 1), "free");
      done += 2;
    }
  } else if (which == LOOKUP_MISS) {
    for (long i = 0; i < ops; ++i) {
      int32_t id;
      check(epdrt_block_pool_lookup(pool, missing + (size_t)(i & (num_keys - 1)) * KEY_BYTES,
                                    KEY_BYTES, &id),
            "lookup");
      done += 1;
    }
  } else if (which == LOOKUP_MANY_HIT || which == LOOKUP_MANY_MISS) {
    /* Consecutive runs of BATCH keys, as a request's chain of block digests. */
    const unsigned char* base = which == LOOKUP_MANY_HIT ? keys : missing;
    const int hit = which == LOOKUP_MANY_HIT;
    const long per_iter = hit ? 2 * BATCH : BATCH;
    for (long i = 0; i < ops / per_iter; ++i) {
      const size_t first = (size_t)((i * BATCH) & (num_keys - 1));
      check(epdrt_block_pool_lookup_many(pool, base + first * KEY_BYTES, KEY_BYTES, BATCH, ids),
            "lookup_many");
      if (hit) check(epdrt_block_pool_free(pool, ids, BATCH), "free");
      done += per_iter;
    }
  } else {
    for (long i = 0; i < ops / (3 * BATCH); ++i) {
      check(epdrt_block_pool_allocate(pool, BATCH, ids), "allocate");
      for (int j = 0; j < BATCH; ++j) {
        const long k = (i * BATCH + j) & (num_keys - 1);
        check(epdrt_block_pool_commit(pool, ids[j], keys + k * KEY_BYTES, KEY_BYTES, NULL),
              "commit");
      }
      check(epdrt_block_pool_free(pool, ids, BATCH), "free");
      done += 3 * BATCH;
    }
  }
  return done;
}

int main(int argc, char** argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: %s NUM_BLOCKS BLOCK_OPS REPEAT\n", argv[0]);
    return 2;
  }
  const int num_blocks = atoi(argv[1]);
  const long ops = atol(argv[2]);
  const int repeat = atoi(argv[3]);
  const int num_keys = num_blocks / 2; /* a power of two: keys cycle by masking, not division */
  if (num_keys < 1 || (num_keys & (num_keys - 1)) != 0) {
    fprintf(stderr, "NUM_BLOCKS must be a power of two >= 2, got %d\n", num_blocks);
    return 2;
  }
  unsigned char* keys = malloc((size_t)num_keys * KEY_BYTES);
  unsigned char* missing = malloc((size_t)num_keys * KEY_BYTES);
  make_keys(keys, num_keys, 1);
  make_keys(missing, num_keys, 2);
  double* times = malloc(sizeof(double) * (size_t)repeat);
  for (int which = 0; which < NUM_CASES; ++which) {
    long done = 0;
    for (int r = 0; r < repeat; ++r) {
      epdrt_block_pool* pool = prefilled(num_blocks, keys, which == ALLOC_FREE ? 0 : num_keys);
      const double start = now();
      done = run_case(which, pool, ops, keys, num_keys, missing);
      times[r] = now() - start;
      epdrt_block_pool_destroy(pool);
    }
    qsort(times, (size_t)repeat, sizeof(double), cmp_double);
    printf("{\"case\": \"%s\", \"seconds\": %.9f, \"block_ops\": %ld}\n", kNames[which],
           times[repeat / 2], done);
  }
  free(times);
  free(keys);
  free(missing);
  return 0;
}
