// SPDX-License-Identifier: Apache-2.0
// Transfer engine: executes batches of (src region, offset, dst region, offset, bytes) copies
// asynchronously, on worker threads (CPU) or one CUDA stream per peer (GPU).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "epdrt/block_copy.h"
#include "epdrt/region.h"

namespace epdrt {

// One copy of nbytes from src[src_offset] to dst[dst_offset]. Both regions are kept alive by the
// Transfer that runs the op until the Transfer is destroyed or released.
struct TransferOp {
  std::shared_ptr<Region> src;
  uint64_t src_offset = 0;
  std::shared_ptr<Region> dst;
  uint64_t dst_offset = 0;
  uint64_t nbytes = 0;
};

enum class TransferState : int32_t { kPending = 0, kDone = 1, kFailed = 2 };

// How a CUDA transfer moves bytes from the device that maps its sources to the device that maps
// its destinations (Region::opened_on(); the copies run on a stream of the destination's).
enum class CopyPath : int32_t {
  // One device: cudaMemcpyAsync for a few runs, the block-copy kernel for many.
  kSameDevice = 0,
  // The destination's device reaches the source's by peer access (enabled once per pair of
  // devices): the same copies as kSameDevice, launched on the destination's device.
  kPeerAccess = 1,
  // No peer access: one cudaMemcpyPeerAsync per run (the driver stages it through the host).
  kPeerMemcpy = 2,
};

// The path for a copy from src_device to dst_device (CUDA ordinals); can_access_peer is
// cudaDeviceCanAccessPeer(dst_device, src_device).
CopyPath choose_copy_path(int32_t src_device, int32_t dst_device, bool can_access_peer) noexcept;

class TransferEngine;

// Handle of one submitted batch. Thread-safe. Poll with state()/done() or block with wait().
class Transfer {
 public:
  ~Transfer();
  Transfer(const Transfer&) = delete;
  Transfer& operator=(const Transfer&) = delete;

  // Current state; never blocks (a CUDA transfer queries its completion event).
  TransferState state();
  bool done() { return state() != TransferState::kPending; }
  // Blocks until the transfer finishes or timeout_s passes (negative: no limit). Returns the
  // state: kPending means the timeout expired.
  TransferState wait(double timeout_s);
  // Why the transfer failed ("" unless state() is kFailed).
  std::string error() const;

  uint64_t nbytes() const noexcept { return nbytes_; }
  size_t num_ops() const noexcept { return num_ops_; }
  // Contiguous runs after coalescing adjacent ops (what is actually copied).
  size_t num_runs() const noexcept { return runs_.size(); }
  bool on_cuda() const noexcept { return on_cuda_; }
  // How the bytes move: "none" (nothing to copy), "host-inline" (copied by submit),
  // "host-threads", "cuda-same-device", "cuda-peer-access" or "cuda-peer-memcpy" (no peer
  // access between the devices: the driver stages the bytes through the host, the slow path).
  const char* path() const noexcept { return path_; }
  // Drops the references to the regions once the transfer has finished; a no-op before that.
  void release();
  // Runs fn once the transfer has finished (done or failed): now, on this thread, when it has;
  // else on the thread that finishes it (the submitting thread for inline copies, a worker
  // thread, or, on CUDA, the first caller of state() that sees the event complete). fn must not
  // block; it runs with no lock of this transfer held.
  void on_finish(std::function<void()> fn);

 private:
  friend class TransferEngine;
  Transfer() = default;
  void finish_chunk();  // called by a CPU worker after one chunk of runs
  void fail(const std::string& msg);
  void run_hooks();  // runs (and drops) the on_finish callbacks; the state is final

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<int32_t> state_{static_cast<int32_t>(TransferState::kPending)};
  std::atomic<int32_t> chunks_left_{0};
  std::string error_;
  std::vector<std::function<void()>> hooks_;      // on_finish callbacks not yet run (mu_)
  std::vector<std::shared_ptr<Region>> regions_;  // keeps every region alive while copying
  std::vector<CopyOp> runs_;
  uint64_t nbytes_ = 0;
  size_t num_ops_ = 0;
  bool on_cuda_ = false;
  const char* path_ = "none";
  int32_t src_device_ = 0;  // CUDA: the device mapping every source (Region::opened_on)
  int32_t dst_device_ = 0;  // CUDA: the device mapping every destination; the copies run there
  int notify_fd_ = -1;      // the engine's completion eventfd, signalled when this transfer ends
  void* event_ = nullptr;   // cudaEvent_t recorded after the copies (CUDA only)
  void* pinned_ops_ = nullptr;  // pinned copy of runs_ uploaded for the block-copy kernel
  size_t pinned_bytes_ = 0;     // capacity of pinned_ops_
};

// Runs copies between regions. Submitting validates every op first and rejects the whole batch
// (InvalidArgument, nothing copied) when an op is out of bounds, uses a closed region, mixes CPU
// and CUDA regions, reads from or writes to more than one CUDA device (one transfer per device
// pair), or when destination ranges overlap each other or a source range.
//
// CPU: adjacent ops are coalesced into runs. A transfer of at most inline_bytes is copied by
// submit() itself, on the calling thread (a hand-off to a worker costs more than such a copy);
// a larger one is split into chunks of about the same size, copied by num_threads worker
// threads, and submit() only enqueues. CUDA: one stream per peer key
// on the destination's device; by the CopyPath of the device pair, a batch becomes a few
// cudaMemcpyAsync calls or one batched launch when it has many runs (same device, or peer
// access), or one cudaMemcpyPeerAsync per run (no peer access); then an event completes it.
// Transfers are independent: no ordering is promised between two transfers on CPU; on CUDA,
// transfers of the same peer run in order.
class TransferEngine {
 public:
  // num_threads <= 0 picks min(4, hardware threads). inline_bytes: CPU transfers up to this size
  // are copied on the submitting thread (0: none).
  explicit TransferEngine(int num_threads = 0, uint64_t inline_bytes = kInlineBytes);
  // Finishes every queued copy, then stops the workers and destroys the CUDA streams.
  ~TransferEngine();
  TransferEngine(const TransferEngine&) = delete;
  TransferEngine& operator=(const TransferEngine&) = delete;

  // Validates and starts ops. peer selects the CUDA stream (0: the destination region's id).
  //
  // after_stream: the producer's stream (a cudaStream_t; 0, i.e. nullptr, is the legacy default
  // stream, a real stream). The copies of a CUDA transfer start only after all work enqueued on
  // it before this call, e.g. the kernel that wrote the source on torch's current stream; the
  // engine records its own event there and makes its copy stream wait on it, so the caller's
  // thread never blocks. Handles that name a stream of "the current device" (0,
  // cudaStreamLegacy, cudaStreamPerThread) mean the calling thread's current device. Ignored by
  // CPU transfers (host producers have finished writing when they call submit) and by empty
  // ones. nullopt: no ordering against any other stream.
  std::shared_ptr<Transfer> submit(const std::vector<TransferOp>& ops, uint64_t peer = 0,
                                   std::optional<void*> after_stream = std::nullopt);
  // n copies from src to dst: src_offsets[i] -> dst_offsets[i], sizes[i] bytes each (or
  // uniform_nbytes each when sizes is null). Same checks and after_stream as submit().
  std::shared_ptr<Transfer> submit_blocks(const std::shared_ptr<Region>& src,
                                          const std::shared_ptr<Region>& dst,
                                          const uint64_t* src_offsets, const uint64_t* dst_offsets,
                                          const uint64_t* sizes, uint64_t uniform_nbytes, size_t n,
                                          uint64_t peer = 0,
                                          std::optional<void*> after_stream = std::nullopt);

  int num_threads() const noexcept { return static_cast<int>(workers_.size()); }
  uint64_t inline_bytes() const noexcept { return inline_bytes_; }
  // An eventfd (non-blocking) that is incremented each time one of this engine's transfers
  // finishes: poll it to wait for many transfers at once. Owned by the engine.
  int completion_fd() const noexcept { return completion_fd_; }

  // Smallest piece a CPU transfer is split into for parallel copying.
  static constexpr uint64_t kMinChunkBytes = 256 << 10;
  // Default inline_bytes, one chunk: up to it, waking a worker costs more than the copy (a
  // 2-core VM, submit to wait: 4 KiB 67 -> 3 us, 64 KiB 48 -> 7 us, 256 KiB 64 -> 14 us
  // inline; docs/architecture.md).
  static constexpr uint64_t kInlineBytes = 256 << 10;
  // A CUDA transfer with more runs than this uses one batched launch.
  static constexpr size_t kMaxSingleCopies = 4;

 private:
  struct Chunk {
    std::shared_ptr<Transfer> transfer;
    size_t begin;  // runs [begin, end) of transfer->runs_, already split to chunk boundaries
    size_t end;
  };

  std::shared_ptr<Transfer> start(std::shared_ptr<Transfer> t, uint64_t peer,
                                  std::optional<void*> after_stream);
  void start_cpu(const std::shared_ptr<Transfer>& t);
  // Copies runs [begin, end) of t on this thread and counts the chunk finished.
  static void copy_chunk(Transfer& t, size_t begin, size_t end);
  void start_cuda(const std::shared_ptr<Transfer>& t, uint64_t peer,
                  std::optional<void*> after_stream);
  void worker_loop();

  int completion_fd_ = -1;
  uint64_t inline_bytes_ = kInlineBytes;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Chunk> queue_;
  bool stopping_ = false;
  std::vector<std::thread> workers_;

  void* acquire_pinned(size_t bytes, size_t* capacity);
  void reap_cuda();  // with cuda_mu_ held: drops finished transfers, recycles their pinned arrays
  // With cuda_mu_ held and dst current: the path from src to dst, enabling peer access the
  // first time a pair needs it.
  CopyPath resolve_copy_path(int32_t src, int32_t dst);
  // With cuda_mu_ held: records the engine's event of the stream's device on `stream` and
  // returns it (a cudaEvent_t), for the copy stream to wait on.
  void* record_producer(void* stream);

  std::mutex cuda_mu_;
  std::unordered_map<uint64_t, void*> streams_;  // (peer, device) key -> cudaStream_t
  std::vector<std::shared_ptr<Transfer>> inflight_cuda_;
  std::multimap<size_t, void*> pinned_pool_;  // capacity -> free pinned host buffer
  // Device -> cudaEvent_t recorded on producer streams of that device. One per device is
  // enough: each is recorded and waited on under cuda_mu_, and cudaStreamWaitEvent waits for
  // the record made before it, whatever is recorded later.
  std::unordered_map<int, void*> producer_events_;
  std::map<std::pair<int32_t, int32_t>, CopyPath> copy_paths_;  // (src, dst) device -> path
};

}  // namespace epdrt
