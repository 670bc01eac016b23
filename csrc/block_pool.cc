// SPDX-License-Identifier: Apache-2.0
#include "epdrt/block_pool.h"

#include <algorithm>
#include <cstring>
#include <mutex>

#include "epdrt/common.h"

namespace epdrt {

namespace {

// One odd multiplier per 8-byte word of a key: the words' products are independent (they
// pipeline), and the finalizer (MurmurHash3's fmix64) spreads every input bit over the result.
constexpr uint64_t kWordMultipliers[BlockKey::kMaxBytes / 8] = {
    0x9e3779b97f4a7c15ull, 0xbf58476d1ce4e5b9ull, 0x94d049bb133111ebull, 0xff51afd7ed558ccdull,
    0xc4ceb9fe1a85ec53ull, 0x87c37b91114253d5ull, 0x4cf5ad432745937full, 0xd6e8feb86659fd93ull};

// Hash of a key's size bytes and kind. Reads the bytes where the caller left them: the last
// partial word is assembled in a register (a byte copy into a stack word and a wide load of it
// would stall on store forwarding).
uint64_t hash_key_bytes(const uint8_t* data, size_t size, BlockKey::Kind kind) {
  uint64_t h = (size | (uint64_t{static_cast<uint8_t>(kind)} << 8)) * 0x2545f4914f6cdd1dull;
  size_t i = 0;
  for (; 8 * (i + 1) <= size; ++i) {
    uint64_t word;
    std::memcpy(&word, data + 8 * i, 8);
    h += word * kWordMultipliers[i];
  }
  if (8 * i < size) {
    uint64_t word = 0;
    for (size_t j = 8 * i; j < size; ++j) word |= uint64_t{data[j]} << (8 * (j - 8 * i));
    h += word * kWordMultipliers[i];
  }
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdull;
  h ^= h >> 33;
  h *= 0xc4ceb9fe1a85ec53ull;
  return h ^ (h >> 33);
}

void check_key_size(size_t size) {
  EPDRT_ASSERT(size > 0 && size <= BlockKey::kMaxBytes, "a block key must have 1 to ",
               BlockKey::kMaxBytes, " bytes, got ", size);
}

}  // namespace

BlockKey BlockKey::from_bytes(const void* data, size_t size) {
  check_key_size(size);
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
  slots_.assign(num_slots, kNil);
  slot_mask_ = num_slots - 1;
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

int64_t BlockPool::index_find(const KeyRef& key) const {
  for (uint64_t slot = key.hash & slot_mask_;; slot = (slot + 1) & slot_mask_) {
    const int32_t id = slots_[slot];
    if (id == kNil) return kNil;
    const BlockKey& held = blocks_[id].key;
    if (held.hash == key.hash && held.size == key.size && held.kind == key.kind &&
        std::memcmp(held.bytes.data(), key.data, key.size) == 0) {
      return static_cast<int64_t>(slot);
    }
  }
}

void BlockPool::index_insert(int32_t id) {
  uint64_t slot = blocks_[id].key.hash & slot_mask_;
  while (slots_[slot] != kNil) slot = (slot + 1) & slot_mask_;
  slots_[slot] = id;
}

void BlockPool::index_erase(int64_t slot) {
  // Backward-shift deletion: move later entries of the probe run into the hole when the hole
  // lies between their home slot and where they sit, so no lookup ever stops early.
  uint64_t hole = static_cast<uint64_t>(slot);
  for (uint64_t next = (hole + 1) & slot_mask_; slots_[next] != kNil;
       next = (next + 1) & slot_mask_) {
    const uint64_t home = blocks_[slots_[next]].key.hash & slot_mask_;
    if (((next - home) & slot_mask_) >= ((next - hole) & slot_mask_)) {
      slots_[hole] = slots_[next];
      hole = next;
    }
  }
  slots_[hole] = kNil;
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
  if (slot != kNil) return slots_[slot] == id;
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

int32_t BlockPool::lookup_locked(const KeyRef& key) {
  const int64_t slot = index_find(key);
  if (slot == kNil) {
    ++stats_.misses;
    return kNil;
  }
  const int32_t id = slots_[slot];
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
  std::lock_guard<SpinLock> lock(mu_);
  const int32_t id = lookup_locked(KeyRef::of(key));
  if (id == kNil) return std::nullopt;
  return id;
}

void BlockPool::lookup_many(const BlockKey* keys, size_t n, int32_t* out) {
  std::lock_guard<SpinLock> lock(mu_);
  for (size_t i = 0; i < n; ++i) out[i] = lookup_locked(KeyRef::of(keys[i]));
}

void BlockPool::lookup_many(const void* keys, size_t key_size, size_t n, int32_t* out) {
  check_key_size(key_size);
  const auto* bytes = static_cast<const uint8_t*>(keys);
  std::lock_guard<SpinLock> lock(mu_);
  for (size_t i = 0; i < n; ++i) {
    const uint8_t* key = bytes + i * key_size;
    const BlockKey::Kind kind = BlockKey::Kind::kBytes;
    out[i] = lookup_locked({key, key_size, kind, hash_key_bytes(key, key_size, kind)});
  }
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
