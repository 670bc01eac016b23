// SPDX-License-Identifier: Apache-2.0
// Fixed-size block bookkeeping: reference counts, an LRU free queue and a content-key index.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <vector>

#include "epdrt/spin_lock.h"

namespace epdrt {

// A content key: up to kMaxBytes opaque bytes (a digest) or a 64-bit integer, and its 64-bit
// hash, computed once when the key is made (outside the pool's lock). The kind is part of the
// key: the integer 1 and the byte string 01 00 00 00 00 00 00 00 are different keys.
struct BlockKey {
  enum class Kind : uint8_t { kBytes = 0, kInt = 1 };
  static constexpr size_t kMaxBytes = 64;
  std::array<uint8_t, kMaxBytes> bytes{};  // zero past size
  uint64_t hash = 0;
  uint8_t size = 0;
  Kind kind = Kind::kBytes;

  // Throws InvalidArgument unless valid_size(size).
  static BlockKey from_bytes(const void* data, size_t size);
  static constexpr bool valid_size(size_t size) { return size - 1 < kMaxBytes; }  // 1..kMaxBytes
  // Throws InvalidArgument unless valid_size(size); inlined, with the throw out of line.
  static void check_size(size_t size) {
    if (!valid_size(size)) throw_bad_size(size);
  }
  // The integer's 8 bytes, little-endian.
  static BlockKey from_int(uint64_t value);

 private:
  [[noreturn]] EPDRT_COLD static void throw_bad_size(size_t size);
};

// Counters of a BlockPool. Gauges (num_*) are exact; hits/misses/evictions count since creation.
struct BlockPoolStats {
  int32_t num_blocks = 0;
  int32_t num_free = 0;    // blocks with reference count 0 (in the free queue)
  int32_t num_cached = 0;  // free blocks that still hold a content key
  uint64_t hits = 0;       // lookups that found their key
  uint64_t misses = 0;     // lookups that did not
  uint64_t evictions = 0;  // keyed free blocks reused by allocate (their key forgotten)
};

// Hands out block ids in [0, num_blocks); knows nothing about the memory behind them.
//
// Every block is either used (reference count > 0) or in the free queue (count 0). The free
// queue is ordered oldest-freed first; allocate takes from its front, so the least recently
// freed blocks are reused (and their keys evicted) first. A free block that still holds a key
// can be revived by lookup, which removes it from the queue in O(1).
//
// Thread-safe: every public method takes the pool's lock (a SpinLock: operations are short).
// Methods that take a list validate the whole list before changing anything, so a failed call
// leaves the pool as it was.
class BlockPool {
 public:
  explicit BlockPool(int32_t num_blocks);
  BlockPool(const BlockPool&) = delete;
  BlockPool& operator=(const BlockPool&) = delete;

  // Takes n blocks from the front of the free queue, each with reference count 1, and appends
  // their ids to out. Throws PoolExhausted (changing nothing) if fewer than n are free.
  void allocate(int32_t n, std::vector<int32_t>& out);
  // The same, writing the ids to out[0..n).
  void allocate(int32_t n, int32_t* out);
  // Drops one reference per listed id (an id may repeat); blocks reaching 0 join the back of
  // the free queue in list order. Throws InvalidArgument for an id out of range or not held.
  void free(const int32_t* ids, size_t n);
  // Adds one reference per listed id. Every id must be in use (count > 0).
  void incref(const int32_t* ids, size_t n);
  // Records key as the content of block id (in use). Returns false, changing nothing, when
  // another block already holds the key; a block that held a different key gives it up.
  bool commit(int32_t id, const BlockKey& key);
  // commit() of n (id, key) pairs in order, writing each result to committed[i]. Every id is
  // checked first, so an invalid one changes nothing.
  void commit_many(const int32_t* ids, const BlockKey* keys, size_t n, bool* committed);
  // The block holding key, with one more reference (revived from the free queue if needed).
  std::optional<int32_t> lookup(const BlockKey& key);
  // lookup() of a bytes key of key_size bytes where it lies (the C API's format), writing the
  // block or -1 to *out. The caller has checked BlockKey::valid_size(key_size): this is the C
  // API's hot path, and it has no error to report.
  void lookup_into(const void* key, size_t key_size, int32_t* out) noexcept;
  // lookup() of n keys under one acquisition of the lock; out[i] is the block or -1.
  void lookup_many(const BlockKey* keys, size_t n, int32_t* out);
  // The same for n keys of key_size bytes each, stored back to back (the C API's format);
  // hashed in place (no copies) before the lock is taken, which is held once per
  // kLookupChunk keys. Throws InvalidArgument for a bad key_size, changing nothing.
  void lookup_many(const void* keys, size_t key_size, size_t n, int32_t* out);
  // Reference count of block id (0 when free).
  int32_t ref_count(int32_t id) const;
  // Ids in the free queue, front (next to be allocated) first. O(num_free); for tests.
  std::vector<int32_t> free_queue() const;
  BlockPoolStats stats() const;
  int32_t num_blocks() const noexcept { return static_cast<int32_t>(blocks_.size()); }

 private:
  static constexpr int32_t kNil = -1;
  static constexpr size_t kLookupChunk = 32;
  struct Block {
    int32_t ref_count = 0;
    int32_t prev = kNil;  // free-queue links, valid while ref_count == 0
    int32_t next = kNil;
    bool has_key = false;
    BlockKey key;  // valid while has_key
  };

  // A key's bytes where they lie (in a BlockKey or a caller's buffer) and their hash.
  struct KeyRef {
    const uint8_t* data;
    size_t size;
    BlockKey::Kind kind;
    uint64_t hash;
    static KeyRef of(const BlockKey& key) {
      return {key.bytes.data(), key.size, key.kind, key.hash};
    }
  };

  void check_id(int32_t id) const;
  void queue_push_back(int32_t id);
  void queue_remove(int32_t id);
  void forget_key(int32_t id);
  // An index entry: a block id (kNil = empty) and 32 middle bits of its key's hash (the top
  // bits choose the slot), so a probe passes over other keys without loading their blocks.
  struct Slot {
    int32_t id = kNil;
    uint32_t tag = 0;
    static uint32_t tag_of(uint64_t hash) { return static_cast<uint32_t>(hash >> 16); }
  };

  // Index: open addressing with linear probing over slots_, sized
  // to a power of two at least twice num_blocks so probes stay short; no tombstones
  // (backward-shift deletion). Returns the slot holding key, or kNil.
  int64_t index_find(const KeyRef& key) const;
  void index_insert(int32_t id);
  void index_erase(int64_t slot);
  void check_used(int32_t id, const char* what) const;
  bool commit_locked(int32_t id, const BlockKey& key);
  int32_t lookup_locked(const KeyRef& key);  // block id or kNil (the caller counts misses)
  // lookup_into's probe past an occupied home slot. Called with mu_ held; releases it.
  void lookup_into_locked(const uint8_t* key, size_t key_size, uint64_t hash,
                          int32_t* out) noexcept;

  mutable SpinLock mu_;
  std::vector<Block> blocks_;
  std::vector<Slot> slots_;
  uint64_t slot_mask_ = 0;
  int slot_shift_ = 0;  // 64 - log2(number of slots)
  // The slot where a key with this hash starts probing: the hash's top bits.
  uint64_t home_slot(uint64_t hash) const { return hash >> slot_shift_; }
  // Starts loading that slot's cache line. Safe without the lock (slots_ never reallocates, and
  // a prefetch has no effect but timing): issued before taking it, the load overlaps the lock's
  // acquisition instead of following it.
  void prefetch_home_slot(uint64_t hash) const {
    __builtin_prefetch(slots_.data() + home_slot(hash));
  }
  int32_t head_ = kNil;  // oldest free block
  int32_t tail_ = kNil;  // newest free block
  BlockPoolStats stats_;
};

}  // namespace epdrt
