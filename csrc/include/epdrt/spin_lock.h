// SPDX-License-Identifier: Apache-2.0
// A lock for critical sections of a few tens of nanoseconds (the block pool's operations).
#pragma once

#include <atomic>
#include <thread>

#include "epdrt/common.h"

namespace epdrt {

// Test-and-test-and-set lock, usable with std::lock_guard. Taking it uncontended costs one
// atomic exchange and giving it back one release store; std::mutex pays a second atomic
// read-modify-write on unlock (about 2.5x the cost on x86). Waiters spin on a plain load,
// then yield their core, so a holder that was preempted is not starved.
class SpinLock {
 public:
  void lock() noexcept {
    if (locked_.exchange(true, std::memory_order_acquire)) lock_contended();
  }
  bool try_lock() noexcept {
    return !locked_.load(std::memory_order_relaxed) &&
           !locked_.exchange(true, std::memory_order_acquire);
  }
  void unlock() noexcept { locked_.store(false, std::memory_order_release); }

 private:
  static constexpr int kSpinsBeforeYield = 64;

  // Out of line: callers inline only the exchange, so their fast path stays small.
  EPDRT_COLD void lock_contended() noexcept {
    for (int spins = 0;;) {
      while (locked_.load(std::memory_order_relaxed)) {
        if (++spins < kSpinsBeforeYield) {
          cpu_relax();
        } else {
          std::this_thread::yield();
        }
      }
      if (!locked_.exchange(true, std::memory_order_acquire)) return;
    }
  }

  static void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
  }

  std::atomic<bool> locked_{false};
};

}  // namespace epdrt
