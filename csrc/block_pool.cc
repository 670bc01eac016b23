// SPDX-License-Identifier: Apache-2.0
#include "epdrt/block_pool.h"

#include <cstring>

#include "epdrt/common.h"

namespace epdrt {

BlockKey BlockKey::from_bytes(const void* data, size_t size) {
  EPDRT_ASSERT(size > 0 && size <= kMaxBytes, "a block key must have 1 to ", kMaxBytes,
               " bytes, got ", size);
  BlockKey key;
  std::memcpy(key.bytes.data(), data, size);
  key.size = static_cast<uint8_t>(size);
  return key;
}

bool BlockKey::operator==(const BlockKey& other) const noexcept {
  return size == other.size && std::memcmp(bytes.data(), other.bytes.data(), size) == 0;
}

size_t BlockKeyHash::operator()(const BlockKey& key) const noexcept {
  // Bytes past key.size are zero, so hashing whole words covers exactly the key.
  uint64_t h = 0x9e3779b97f4a7c15ull ^ key.size;
  const size_t num_words = (key.size + 7) / 8;
  for (size_t i = 0; i < num_words; ++i) {
    uint64_t word;
    std::memcpy(&word, key.bytes.data() + 8 * i, 8);
    h = (h ^ word) * 0xbf58476d1ce4e5b9ull;
    h ^= h >> 31;
  }
  return static_cast<size_t>(h);
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

int64_t BlockPool::index_find(const BlockKey& key, uint64_t hash) const {
  for (uint64_t slot = hash & slot_mask_;; slot = (slot + 1) & slot_mask_) {
    const int32_t id = slots_[slot];
    if (id == kNil) return kNil;
    const Block& b = blocks_[id];
    if (b.hash == hash && b.key == key) return static_cast<int64_t>(slot);
  }
}

void BlockPool::index_insert(int32_t id) {
  uint64_t slot = blocks_[id].hash & slot_mask_;
  while (slots_[slot] != kNil) slot = (slot + 1) & slot_mask_;
  slots_[slot] = id;
}

void BlockPool::index_erase(int64_t slot) {
  // Backward-shift deletion: move later entries of the probe run into the hole when the hole
  // lies between their home slot and where they sit, so no lookup ever stops early.
  uint64_t hole = static_cast<uint64_t>(slot);
  for (uint64_t next = (hole + 1) & slot_mask_; slots_[next] != kNil;
       next = (next + 1) & slot_mask_) {
    const uint64_t home = blocks_[slots_[next]].hash & slot_mask_;
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
  index_erase(index_find(block.key, block.hash));
  block.has_key = false;
}

void BlockPool::allocate(int32_t n, std::vector<int32_t>& out) {
  std::lock_guard<std::mutex> lock(mu_);
  EPDRT_ASSERT(n >= 0, "cannot allocate a negative number of blocks (", n, ")");
  if (n > stats_.num_free) {
    throw PoolExhausted(detail::concat("cannot allocate ", n, " blocks: ", stats_.num_free, " of ",
                                       num_blocks(), " are free"));
  }
  out.reserve(out.size() + static_cast<size_t>(n));
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
    out.push_back(id);
  }
  stats_.num_free -= n;
}

void BlockPool::free(const int32_t* ids, size_t n) {
  std::lock_guard<std::mutex> lock(mu_);
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
  std::lock_guard<std::mutex> lock(mu_);
  for (size_t i = 0; i < n; ++i) check_used(ids[i], "incref (use lookup to revive)");
  for (size_t i = 0; i < n; ++i) ++blocks_[ids[i]].ref_count;
}

void BlockPool::check_used(int32_t id, const char* what) const {
  check_id(id);
  EPDRT_ASSERT(blocks_[id].ref_count > 0, "cannot ", what, " block ", id, ": it is not allocated");
}

bool BlockPool::commit_locked(int32_t id, const BlockKey& key) {
  const uint64_t hash = BlockKeyHash{}(key);
  const int64_t slot = index_find(key, hash);
  if (slot != kNil) return slots_[slot] == id;
  forget_key(id);
  Block& b = blocks_[id];
  b.key = key;
  b.hash = hash;
  b.has_key = true;
  index_insert(id);
  return true;
}

bool BlockPool::commit(int32_t id, const BlockKey& key) {
  std::lock_guard<std::mutex> lock(mu_);
  check_used(id, "commit");
  return commit_locked(id, key);
}

void BlockPool::commit_many(const int32_t* ids, const BlockKey* keys, size_t n, bool* committed) {
  std::lock_guard<std::mutex> lock(mu_);
  for (size_t i = 0; i < n; ++i) check_used(ids[i], "commit");
  for (size_t i = 0; i < n; ++i) committed[i] = commit_locked(ids[i], keys[i]);
}

std::optional<int32_t> BlockPool::lookup(const BlockKey& key) {
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t slot = index_find(key, BlockKeyHash{}(key));
  if (slot == kNil) {
    ++stats_.misses;
    return std::nullopt;
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

int32_t BlockPool::ref_count(int32_t id) const {
  std::lock_guard<std::mutex> lock(mu_);
  check_id(id);
  return blocks_[id].ref_count;
}

std::vector<int32_t> BlockPool::free_queue() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<int32_t> ids;
  ids.reserve(static_cast<size_t>(stats_.num_free));
  for (int32_t id = head_; id != kNil; id = blocks_[id].next) ids.push_back(id);
  return ids;
}

BlockPoolStats BlockPool::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

}  // namespace epdrt
