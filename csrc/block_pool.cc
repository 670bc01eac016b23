// SPDX-License-Identifier: Apache-2.0
#include "epdrt/block_pool.h"

#include <algorithm>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <utility>

#include "epdrt/common.h"

namespace epdrt {

namespace {

// One odd multiplier per 8-byte word of a key. A key's hash is the sum of its words times
// their multipliers: the products are independent (they pipeline), and a product's top bits
// depend on every bit of its word, so the index takes its slot from the hash's top bits
// (multiplicative hashing). No finalizer: a lookup's latency, inside the lock, is mostly
// this hash's dependency chain, and a finalizer would double it.
constexpr uint64_t kWordMultipliers[BlockKey::kMaxBytes / 8] = {
    0x9e3779b97f4a7c15ull, 0xbf58476d1ce4e5b9ull, 0x94d049bb133111ebull, 0xff51afd7ed558ccdull,
    0xc4ceb9fe1a85ec53ull, 0x87c37b91114253d5ull, 0x4cf5ad432745937full, 0xd6e8feb86659fd93ull};

// Sum of the key's 8-byte words, each times its own multiplier; kFull whole words, then
// `tail` bytes (< 8) assembled in a register: a byte copy into a stack word and a wide load of
// it would stall on store forwarding.
template <size_t kFull>
EPDRT_ALWAYS_INLINE uint64_t mix_words(const uint8_t* data, size_t tail, uint64_t h) {
  for (size_t i = 0; i < kFull; ++i) {
    uint64_t word;
    std::memcpy(&word, data + 8 * i, 8);
    h += word * kWordMultipliers[i];
  }
  if (tail != 0) {
    uint64_t word = 0;
    for (size_t j = 0; j < tail; ++j) word |= uint64_t{data[8 * kFull + j]} << (8 * j);
    h += word * kWordMultipliers[kFull];
  }
  return h;
}

// Calls fn(std::integral_constant<size_t, W>{}) with W = min(size / 8, 8), the key's whole
// 8-byte words (sizes above 64 are rejected before), so the hash is compiled once per word
// count: a caller hashing many keys of one size picks the specialization once, not per key.
template <typename Fn, size_t... kWords>
EPDRT_ALWAYS_INLINE void dispatch_words(size_t words, Fn&& fn, std::index_sequence<kWords...>) {
  // A chain of compares, which the compiler turns into a jump table.
  (void)((words == kWords && (fn(std::integral_constant<size_t, kWords>{}), true)) || ...);
}

template <typename Fn>
EPDRT_ALWAYS_INLINE void with_key_words(size_t size, Fn&& fn) {
  constexpr size_t kMaxWords = BlockKey::kMaxBytes / 8;
  dispatch_words(std::min(size / 8, kMaxWords), std::forward<Fn>(fn),
                 std::make_index_sequence<kMaxWords + 1>{});
}

// Hash of a key of size bytes (kFull whole words) and kind, read where the caller left them:
// a few independent multiplies and adds.
template <size_t kFull>
EPDRT_ALWAYS_INLINE uint64_t hash_key(const uint8_t* data, size_t size, BlockKey::Kind kind) {
  const uint64_t h = (size | (uint64_t{static_cast<uint8_t>(kind)} << 8)) * 0x2545f4914f6cdd1dull;
  return mix_words<kFull>(data, size % 8, h);
}

// Keys of this size skip the dispatch on size: the runtime's content keys are 32-byte digests
// (BLAKE2b-256 of images; SHA-256 and BLAKE3 are 32 bytes too).
constexpr size_t kDigestBytes = 32;

EPDRT_ALWAYS_INLINE uint64_t hash_key_bytes(const uint8_t* data, size_t size, BlockKey::Kind kind) {
  if (__builtin_expect(size == kDigestBytes, 1))
    return hash_key<kDigestBytes / 8>(data, size, kind);
  uint64_t hash = 0;
  with_key_words(size,
                 [&](auto words) { hash = hash_key<decltype(words)::value>(data, size, kind); });
  return hash;
}

}  // namespace

void BlockKey::throw_bad_size(size_t size) {
  throw InvalidArgument(
      detail::concat("a block key must have 1 to ", BlockKey::kMaxBytes, " bytes, got ", size));
}

BlockKey BlockKey::from_bytes(const void* data, size_t size) {
  check_size(size);
  BlockKey key;
  std::memcpy(key.bytes.data(), data, size);
  key.size = static_cast<uint8_t>(size);
  key.hash = hash_key_bytes(static_cast<const uint8_t*>(data), size, Kind::kBytes);
  return key;
}

BlockKey BlockKey::from_int(uint64_t value) {
  BlockKey key;
  for (size_t i = 0; i < 8; ++i) key.bytes[i] = static_cast<uint8_t>(value >> (8 * i));
  key.size = 8;
  key.kind = Kind::kInt;
  key.hash = hash_key_bytes(key.bytes.data(), 8, Kind::kInt);
  return key;
}

BlockPool::BlockPool(int32_t num_blocks) {
  EPDRT_ASSERT(num_blocks > 0, "num_blocks must be positive, got ", num_blocks);
  blocks_.resize(num_blocks);
  size_t num_slots = 16;
  while (num_slots < 2 * static_cast<size_t>(num_blocks)) num_slots *= 2;
  slots_.assign(num_slots, Slot{});
  slot_mask_ = num_slots - 1;
  slot_shift_ = 64 - static_cast<int>(__builtin_ctzll(num_slots));
  for (int32_t id = 0; id < num_blocks; ++id) queue_push_back(id);
  stats_.num_blocks = num_blocks;
  stats_.num_free = num_blocks;
}

void BlockPool::check_id(int32_t id) const {
  EPDRT_ASSERT(id >= 0 && id < num_blocks(), "block id ", id, " is out of range [0, ", num_blocks(),
               ")");
}

void BlockPool::queue_push_back(int32_t id) {
  Block& b = blocks_[id];
  b.prev = tail_;
  b.next = kNil;
  if (tail_ != kNil) {
    blocks_[tail_].next = id;
  } else {
    head_ = id;
  }
  tail_ = id;
}

void BlockPool::queue_remove(int32_t id) {
  Block& b = blocks_[id];
  if (b.prev != kNil) {
    blocks_[b.prev].next = b.next;
  } else {
    head_ = b.next;
  }
  if (b.next != kNil) {
    blocks_[b.next].prev = b.prev;
  } else {
    tail_ = b.prev;
  }
  b.prev = b.next = kNil;
}

EPDRT_ALWAYS_INLINE int64_t BlockPool::index_find(const KeyRef& key) const {
  const uint32_t tag = Slot::tag_of(key.hash);
  for (uint64_t slot = home_slot(key.hash);; slot = (slot + 1) & slot_mask_) {
    const Slot entry = slots_[slot];
    if (entry.id == kNil) return kNil;
    if (entry.tag != tag) continue;  // a different key, told without touching its block
    const BlockKey& held = blocks_[entry.id].key;
    if (held.hash == key.hash && held.size == key.size && held.kind == key.kind &&
        std::memcmp(held.bytes.data(), key.data, key.size) == 0) {
      return static_cast<int64_t>(slot);
    }
  }
}

void BlockPool::index_insert(int32_t id) {
  const uint64_t hash = blocks_[id].key.hash;
  uint64_t slot = home_slot(hash);
  while (slots_[slot].id != kNil) slot = (slot + 1) & slot_mask_;
  slots_[slot] = {id, Slot::tag_of(hash)};
}

void BlockPool::index_erase(int64_t slot) {
  // Backward-shift deletion: move later entries of the probe run into the hole when the hole
  // lies between their home slot and where they sit, so no lookup ever stops early.
  uint64_t hole = static_cast<uint64_t>(slot);
  for (uint64_t next = (hole + 1) & slot_mask_; slots_[next].id != kNil;
       next = (next + 1) & slot_mask_) {
    const uint64_t home = home_slot(blocks_[slots_[next].id].key.hash);
    if (((next - home) & slot_mask_) >= ((next - hole) & slot_mask_)) {
      slots_[hole] = slots_[next];
      hole = next;
    }
  }
  slots_[hole] = Slot{};
}

void BlockPool::forget_key(int32_t id) {
  Block& block = blocks_[id];
  if (!block.has_key) return;
  index_erase(index_find(KeyRef::of(block.key)));
  block.has_key = false;
}

void BlockPool::allocate(int32_t n, std::vector<int32_t>& out) {
  const size_t start = out.size();
  out.resize(start + static_cast<size_t>(std::max(n, 0)));
  try {
    allocate(n, out.data() + start);
  } catch (...) {
    out.resize(start);
    throw;
  }
}

void BlockPool::allocate(int32_t n, int32_t* out) {
  std::lock_guard<SpinLock> lock(mu_);
  EPDRT_ASSERT(n >= 0, "cannot allocate a negative number of blocks (", n, ")");
  if (n > stats_.num_free) {
    throw PoolExhausted(detail::concat("cannot allocate ", n, " blocks: ", stats_.num_free, " of ",
                                       num_blocks(), " are free"));
  }
  for (int32_t i = 0; i < n; ++i) {
    const int32_t id = head_;
    queue_remove(id);
    Block& b = blocks_[id];
    if (b.has_key) {
      forget_key(id);
      --stats_.num_cached;
      ++stats_.evictions;
    }
    b.ref_count = 1;
    out[i] = id;
  }
  stats_.num_free -= n;
}

void BlockPool::free(const int32_t* ids, size_t n) {
  std::lock_guard<SpinLock> lock(mu_);
  // Pass 1: drop the references, undoing them all if one is invalid.
  for (size_t i = 0; i < n; ++i) {
    const int32_t id = ids[i];
    const bool valid = id >= 0 && id < num_blocks() && blocks_[id].ref_count > 0;
    if (!valid) {
      for (size_t j = 0; j < i; ++j) ++blocks_[ids[j]].ref_count;
      check_id(id);
      const int32_t held = blocks_[id].ref_count;
      if (held == 0)
        throw InvalidArgument(detail::concat("cannot free block ", id, ": it is free"));
      throw InvalidArgument(detail::concat("cannot free block ", id,
                                           ": listed more often than its ", held, " reference(s)"));
    }
    --blocks_[id].ref_count;
  }
  // Pass 2: blocks that reached 0 join the free queue, in order of first appearance.
  for (size_t i = 0; i < n; ++i) {
    const int32_t id = ids[i];
    Block& b = blocks_[id];
    const bool queued = b.prev != kNil || head_ == id;
    if (b.ref_count == 0 && !queued) {
      queue_push_back(id);
      ++stats_.num_free;
      if (b.has_key) ++stats_.num_cached;
    }
  }
}

void BlockPool::incref(const int32_t* ids, size_t n) {
  std::lock_guard<SpinLock> lock(mu_);
  for (size_t i = 0; i < n; ++i) check_used(ids[i], "incref (use lookup to revive)");
  for (size_t i = 0; i < n; ++i) ++blocks_[ids[i]].ref_count;
}

void BlockPool::check_used(int32_t id, const char* what) const {
  check_id(id);
  EPDRT_ASSERT(blocks_[id].ref_count > 0, "cannot ", what, " block ", id, ": it is not allocated");
}

bool BlockPool::commit_locked(int32_t id, const BlockKey& key) {
  const int64_t slot = index_find(KeyRef::of(key));
  if (slot != kNil) return slots_[slot].id == id;
  forget_key(id);
  Block& b = blocks_[id];
  b.key = key;
  b.has_key = true;
  index_insert(id);
  return true;
}

bool BlockPool::commit(int32_t id, const BlockKey& key) {
  std::lock_guard<SpinLock> lock(mu_);
  check_used(id, "commit");
  return commit_locked(id, key);
}

void BlockPool::commit_many(const int32_t* ids, const BlockKey* keys, size_t n, bool* committed) {
  std::lock_guard<SpinLock> lock(mu_);
  for (size_t i = 0; i < n; ++i) check_used(ids[i], "commit");
  for (size_t i = 0; i < n; ++i) committed[i] = commit_locked(ids[i], keys[i]);
}

EPDRT_ALWAYS_INLINE int32_t BlockPool::lookup_locked(const KeyRef& key) {
  const int64_t slot = index_find(key);
  if (slot == kNil) return kNil;
  const int32_t id = slots_[slot].id;
  Block& b = blocks_[id];
  if (b.ref_count == 0) {
    queue_remove(id);
    --stats_.num_free;
    --stats_.num_cached;
  }
  ++b.ref_count;
  ++stats_.hits;
  return id;
}

std::optional<int32_t> BlockPool::lookup(const BlockKey& key) {
  prefetch_home_slot(key.hash);
  std::lock_guard<SpinLock> lock(mu_);
  const int32_t id = lookup_locked(KeyRef::of(key));
  if (id == kNil) {
    ++stats_.misses;
    return std::nullopt;
  }
  return id;
}

void BlockPool::lookup_many(const BlockKey* keys, size_t n, int32_t* out) {
  for (size_t i = 0; i < std::min(n, kLookupChunk); ++i) prefetch_home_slot(keys[i].hash);
  std::lock_guard<SpinLock> lock(mu_);
  uint64_t misses = 0;
  for (size_t i = 0; i < n; ++i) {
    out[i] = lookup_locked(KeyRef::of(keys[i]));
    misses += out[i] == kNil;
  }
  stats_.misses += misses;
}

void BlockPool::lookup_into(const void* key, size_t key_size, int32_t* out) noexcept {
  const auto* bytes = static_cast<const uint8_t*>(key);
  const uint64_t hash = hash_key_bytes(bytes, key_size, BlockKey::Kind::kBytes);
  // slots_ never reallocates: the home slot's address, taken before the lock, holds after it.
  const Slot* home = slots_.data() + home_slot(hash);
  __builtin_prefetch(home);
  mu_.lock();
  // Most misses meet an empty home slot (the index is at most half full) and end here. The
  // rest of the probe, and a hit's bookkeeping, are out of line.
  if (home->id != kNil) return lookup_into_locked(bytes, key_size, hash, out);
  ++stats_.misses;
  mu_.unlock();
  *out = kNil;
}

__attribute__((noinline)) void BlockPool::lookup_into_locked(const uint8_t* key, size_t key_size,
                                                             uint64_t hash, int32_t* out) noexcept {
  std::lock_guard<SpinLock> lock(mu_, std::adopt_lock);
  const int32_t id = lookup_locked({key, key_size, BlockKey::Kind::kBytes, hash});
  stats_.misses += id == kNil;
  *out = id;
}

void BlockPool::lookup_many(const void* keys, size_t key_size, size_t n, int32_t* out) {
  BlockKey::check_size(key_size);
  const auto* bytes = static_cast<const uint8_t*>(keys);
  const BlockKey::Kind kind = BlockKey::Kind::kBytes;
  // The hash is specialized for the key size once, for all n keys. A chunk's keys are hashed,
  // and their home slots prefetched, before the lock is taken, so it is held only for probes.
  with_key_words(key_size, [&](auto words) {
    uint64_t hashes[kLookupChunk];
    for (size_t first = 0; first < n; first += kLookupChunk) {
      const size_t m = std::min(kLookupChunk, n - first);
      const uint8_t* chunk = bytes + first * key_size;
      for (size_t i = 0; i < m; ++i) {
        hashes[i] = hash_key<decltype(words)::value>(chunk + i * key_size, key_size, kind);
        prefetch_home_slot(hashes[i]);
      }
      std::lock_guard<SpinLock> lock(mu_);
      uint64_t misses = 0;
      for (size_t i = 0; i < m; ++i) {
        const int32_t id = lookup_locked({chunk + i * key_size, key_size, kind, hashes[i]});
        out[first + i] = id;
        misses += id == kNil;
      }
      stats_.misses += misses;
    }
  });
}

int32_t BlockPool::ref_count(int32_t id) const {
  std::lock_guard<SpinLock> lock(mu_);
  check_id(id);
  return blocks_[id].ref_count;
}

std::vector<int32_t> BlockPool::free_queue() const {
  std::lock_guard<SpinLock> lock(mu_);
  std::vector<int32_t> ids;
  ids.reserve(static_cast<size_t>(stats_.num_free));
  for (int32_t id = head_; id != kNil; id = blocks_[id].next) ids.push_back(id);
  return ids;
}

BlockPoolStats BlockPool::stats() const {
  std::lock_guard<SpinLock> lock(mu_);
  return stats_;
}

}  // namespace epdrt
