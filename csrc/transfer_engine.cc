// SPDX-License-Identifier: Apache-2.0
// Transfer engine: validation, coalescing, CPU worker threads and per-peer CUDA streams.
#include "epdrt/transfer_engine.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <numeric>
#include <string>
#include <utility>

#include "cuda_util.h"
#include "epdrt/block_copy.h"
#include "epdrt/common.h"

#ifdef EPDRT_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace epdrt {
namespace {

using Clock = std::chrono::steady_clock;

void signal_fd(int fd) {
  if (fd < 0) return;
  const uint64_t one = 1;
  // EAGAIN (counter saturated) still leaves the fd readable, which is all a poller needs.
  while (::write(fd, &one, sizeof(one)) < 0 && errno == EINTR) {
  }
}

// One validated op with resolved pointers; src/dst are the Region objects (not owned here).
struct PlannedOp {
  Region* src;
  uint64_t src_offset;
  Region* dst;
  uint64_t dst_offset;
  uint64_t nbytes;
  size_t index;  // position in the caller's list, for error messages
};

void check_op(const PlannedOp& op) {
  EPDRT_ASSERT(op.src != nullptr && op.dst != nullptr, "transfer op ", op.index,
               ": source and destination regions are required");
  EPDRT_ASSERT(!op.src->is_closed(), "transfer op ", op.index, ": the source region is closed");
  EPDRT_ASSERT(!op.dst->is_closed(), "transfer op ", op.index,
               ": the destination region is closed");
  EPDRT_ASSERT(op.src_offset <= op.src->nbytes() && op.nbytes <= op.src->nbytes() - op.src_offset,
               "transfer op ", op.index, ": source bytes [", op.src_offset, ", ",
               op.src_offset + op.nbytes, ") are out of bounds of a ", op.src->nbytes(),
               "-byte region");
  EPDRT_ASSERT(op.dst_offset <= op.dst->nbytes() && op.nbytes <= op.dst->nbytes() - op.dst_offset,
               "transfer op ", op.index, ": destination bytes [", op.dst_offset, ", ",
               op.dst_offset + op.nbytes, ") are out of bounds of a ", op.dst->nbytes(),
               "-byte region");
}

// Checks every op, orders them by destination (region id, offset), rejects overlapping writes
// and reads of written bytes, and merges ops that continue each other in source and destination.
// Regions are compared by id(), which every mapping of the same memory shares. The devices are
// those whose contexts map the sources and the destinations (Region::opened_on).
std::vector<CopyOp> plan(std::vector<PlannedOp>& ops, bool* on_cuda, int32_t* src_index,
                         int32_t* dst_index) {
  for (const PlannedOp& op : ops) check_op(op);
  ops.erase(
      std::remove_if(ops.begin(), ops.end(), [](const PlannedOp& op) { return op.nbytes == 0; }),
      ops.end());
  *on_cuda = false;
  *src_index = 0;
  *dst_index = 0;
  if (ops.empty()) return {};
  const PlannedOp& first = ops.front();
  const Device src_device = first.src->opened_on();
  const Device dst_device = first.dst->opened_on();
  const DeviceType type = dst_device.type;
  for (const PlannedOp& op : ops) {
    const Device s = op.src->opened_on();
    const Device d = op.dst->opened_on();
    EPDRT_ASSERT(s.type == type && d.type == type, "transfer op ", op.index,
                 ": a transfer copies CPU to CPU or CUDA to CUDA; mixing devices is not supported");
    EPDRT_ASSERT(
        type == DeviceType::kCpu || (s.index == src_device.index && d.index == dst_device.index),
        "transfer op ", op.index, " copies cuda:", s.index, " -> cuda:", d.index, ", op ",
        first.index, " cuda:", src_device.index, " -> cuda:", dst_device.index,
        ": a CUDA transfer reads from one device and writes to one device (submit one "
        "transfer per pair)");
  }
  *on_cuda = type == DeviceType::kCuda;
  *src_index = src_device.index;
  *dst_index = dst_device.index;
  const auto by_destination = [](const PlannedOp& a, const PlannedOp& b) {
    const uint64_t ia = a.dst->id(), ib = b.dst->id();
    return ia != ib ? ia < ib : a.dst_offset < b.dst_offset;
  };
  // Block tables mostly come in order: then the sort is one pass.
  if (!std::is_sorted(ops.begin(), ops.end(), by_destination)) {
    std::sort(ops.begin(), ops.end(), by_destination);
  }
  for (size_t i = 1; i < ops.size(); ++i) {
    const PlannedOp& a = ops[i - 1];
    const PlannedOp& b = ops[i];
    EPDRT_ASSERT(a.dst->id() != b.dst->id() || a.dst_offset + a.nbytes <= b.dst_offset,
                 "transfer ops ", a.index, " and ", b.index,
                 " write overlapping destination bytes (from offset ", b.dst_offset, ")");
  }
  // A source range that meets a destination range would make the result depend on copy order.
  // Only a source region that is also written can: usually the transfer has one destination
  // region and reads another, and nothing is searched.
  std::vector<uint64_t> written;
  for (const PlannedOp& op : ops) {
    if (written.empty() || written.back() != op.dst->id()) written.push_back(op.dst->id());
  }
  for (const PlannedOp& op : ops) {
    const uint64_t id = op.src->id();
    if (std::find(written.begin(), written.end(), id) == written.end()) continue;
    const uint64_t end = op.src_offset + op.nbytes;
    // The last destination range of this region starting before `end` is the only candidate:
    // destination ranges are sorted and disjoint.
    auto it =
        std::lower_bound(ops.begin(), ops.end(), std::make_pair(id, end),
                         [](const PlannedOp& a, const std::pair<uint64_t, uint64_t>& key) {
                           const uint64_t ia = a.dst->id();
                           return ia != key.first ? ia < key.first : a.dst_offset < key.second;
                         });
    if (it == ops.begin()) continue;
    const PlannedOp& w = *std::prev(it);
    EPDRT_ASSERT(w.dst->id() != id || w.dst_offset + w.nbytes <= op.src_offset, "transfer op ",
                 op.index, " reads bytes that op ", w.index, " writes (region offset ",
                 std::max(w.dst_offset, op.src_offset), ")");
  }
  std::vector<CopyOp> runs;
  runs.reserve(ops.size());
  const PlannedOp* prev = nullptr;
  for (const PlannedOp& op : ops) {
    const bool continues = prev != nullptr && prev->src == op.src && prev->dst == op.dst &&
                           prev->src_offset + prev->nbytes == op.src_offset &&
                           prev->dst_offset + prev->nbytes == op.dst_offset;
    if (continues) {
      runs.back().nbytes += op.nbytes;
    } else {
      runs.push_back(CopyOp{static_cast<const uint8_t*>(op.src->data()) + op.src_offset,
                            static_cast<uint8_t*>(op.dst->data()) + op.dst_offset, op.nbytes});
    }
    prev = &op;
  }
  return runs;
}

// Splits runs so that they fall into `parts` groups of about the same number of bytes; returns
// the group boundaries (parts + 1 indices into the new runs).
std::vector<size_t> split_evenly(std::vector<CopyOp>& runs, uint64_t total, size_t parts) {
  std::vector<size_t> bounds{0};
  if (parts <= 1) {
    bounds.push_back(runs.size());
    return bounds;
  }
  std::vector<CopyOp> out;
  out.reserve(runs.size() + parts);
  uint64_t done = 0;
  size_t part = 1;
  uint64_t limit = total * part / parts;  // bytes [0, limit) belong to groups < part
  for (CopyOp run : runs) {
    while (run.nbytes > 0) {
      const uint64_t take = std::min(run.nbytes, limit - done);
      out.push_back(CopyOp{run.src, run.dst, take});
      run.src = static_cast<const uint8_t*>(run.src) + take;
      run.dst = static_cast<uint8_t*>(run.dst) + take;
      run.nbytes -= take;
      done += take;
      if (done == limit && part < parts) {
        bounds.push_back(out.size());
        ++part;
        limit = total * part / parts;
      }
    }
  }
  bounds.push_back(out.size());
  runs = std::move(out);
  return bounds;
}

#ifdef EPDRT_WITH_CUDA
using detail::check_cuda;
using detail::DeviceGuard;

// Host function queued after a transfer's event: wakes pollers of the completion fd.
void CUDART_CB signal_completion(void* fd) { signal_fd(*static_cast<const int*>(fd)); }

#endif

}  // namespace

CopyPath choose_copy_path(int32_t src_device, int32_t dst_device, bool can_access_peer) noexcept {
  if (src_device == dst_device) return CopyPath::kSameDevice;
  return can_access_peer ? CopyPath::kPeerAccess : CopyPath::kPeerMemcpy;
}

// ---- Transfer -----------------------------------------------------------------------------

Transfer::~Transfer() {
#ifdef EPDRT_WITH_CUDA
  if (event_ != nullptr) cudaEventDestroy(static_cast<cudaEvent_t>(event_));
  if (pinned_ops_ != nullptr) cudaFreeHost(pinned_ops_);
#endif
}

TransferState Transfer::state() {
  auto s = static_cast<TransferState>(state_.load(std::memory_order_acquire));
  if (s != TransferState::kPending || !on_cuda_) return s;
#ifdef EPDRT_WITH_CUDA
  const cudaError_t err = cudaEventQuery(static_cast<cudaEvent_t>(event_));
  if (err == cudaErrorNotReady) return TransferState::kPending;
  if (err == cudaSuccess) {
    std::lock_guard<std::mutex> lock(mu_);
    int32_t pending = static_cast<int32_t>(TransferState::kPending);
    state_.compare_exchange_strong(pending, static_cast<int32_t>(TransferState::kDone),
                                   std::memory_order_acq_rel);
  } else {
    cudaGetLastError();
    fail(detail::concat("CUDA copy failed: ", cudaGetErrorString(err)));
  }
  run_hooks();
  return static_cast<TransferState>(state_.load(std::memory_order_acquire));
#else
  return s;
#endif
}

TransferState Transfer::wait(double timeout_s) {
  const bool forever = timeout_s < 0;
  const auto deadline =
      Clock::now() + std::chrono::duration_cast<Clock::duration>(
                         std::chrono::duration<double>(forever ? 0.0 : timeout_s));
  if (!on_cuda_) {
    std::unique_lock<std::mutex> lock(mu_);
    const auto finished = [this] {
      return state_.load(std::memory_order_acquire) !=
             static_cast<int32_t>(TransferState::kPending);
    };
    if (forever) {
      cv_.wait(lock, finished);
    } else {
      cv_.wait_until(lock, deadline, finished);
    }
    return static_cast<TransferState>(state_.load(std::memory_order_acquire));
  }
  // CUDA: poll the event, sleeping a little longer each time (no host-blocking sync exists
  // that honours a timeout).
  auto pause = std::chrono::microseconds(2);
  for (;;) {
    const TransferState s = state();
    if (s != TransferState::kPending) return s;
    if (!forever && Clock::now() >= deadline) return s;
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::microseconds(200));
  }
}

std::string Transfer::error() const {
  std::lock_guard<std::mutex> lock(mu_);
  return error_;
}

void Transfer::release() {
  if (!done()) return;
  std::lock_guard<std::mutex> lock(mu_);
  regions_.clear();
  regions_.shrink_to_fit();
}

void Transfer::finish_chunk() {
  if (chunks_left_.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    // A chunk that failed already moved the state to kFailed; keep it.
    int32_t pending = static_cast<int32_t>(TransferState::kPending);
    state_.compare_exchange_strong(pending, static_cast<int32_t>(TransferState::kDone),
                                   std::memory_order_acq_rel);
  }
  cv_.notify_all();
  run_hooks();
  signal_fd(notify_fd_);
}

void Transfer::on_finish(std::function<void()> fn) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    // The state leaves kPending under mu_, before run_hooks() takes the list. On CPU a chunk's
    // failure sets kFailed while other chunks may still copy: final once the last is counted.
    const bool final =
        state_.load(std::memory_order_acquire) != static_cast<int32_t>(TransferState::kPending) &&
        (on_cuda_ || chunks_left_.load(std::memory_order_acquire) == 0);
    if (!final) {
      hooks_.push_back(std::move(fn));
      return;
    }
  }
  fn();
}

void Transfer::run_hooks() {
  std::vector<std::function<void()>> hooks;
  {
    std::lock_guard<std::mutex> lock(mu_);
    hooks.swap(hooks_);
  }
  for (auto& fn : hooks) fn();
}

void Transfer::fail(const std::string& msg) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (state_.load() != static_cast<int32_t>(TransferState::kPending)) return;
    error_ = msg;
    state_.store(static_cast<int32_t>(TransferState::kFailed), std::memory_order_release);
  }
  cv_.notify_all();
}

// ---- TransferEngine ------------------------------------------------------------------------

TransferEngine::TransferEngine(int num_threads, uint64_t inline_bytes)
    : inline_bytes_(inline_bytes) {
  completion_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (completion_fd_ < 0) {
    throw SystemError(detail::concat("eventfd failed: ", std::strerror(errno)));
  }
  if (num_threads <= 0) {
    const unsigned hw = std::thread::hardware_concurrency();
    num_threads = static_cast<int>(std::clamp(hw, 1u, 4u));
  }
  EPDRT_ASSERT(num_threads <= 256, "num_threads must be at most 256, got ", num_threads);
  workers_.reserve(static_cast<size_t>(num_threads));
  for (int i = 0; i < num_threads; ++i) workers_.emplace_back(&TransferEngine::worker_loop, this);
}

TransferEngine::~TransferEngine() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  for (std::thread& w : workers_) w.join();
#ifdef EPDRT_WITH_CUDA
  // In-flight CUDA transfers keep their regions (and pinned op arrays) until they complete.
  std::lock_guard<std::mutex> lock(cuda_mu_);
  for (auto& t : inflight_cuda_) t->wait(-1);
  reap_cuda();
  // The completion host functions queued after the events must have run before the fd closes.
  for (auto& [key, stream] : streams_) cudaStreamSynchronize(static_cast<cudaStream_t>(stream));
  for (auto& [key, stream] : streams_) cudaStreamDestroy(static_cast<cudaStream_t>(stream));
  for (auto& [cap, p] : pinned_pool_) cudaFreeHost(p);
  for (auto& [device, event] : producer_events_) cudaEventDestroy(static_cast<cudaEvent_t>(event));
#endif
  ::close(completion_fd_);
}

std::shared_ptr<Transfer> TransferEngine::submit(const std::vector<TransferOp>& ops, uint64_t peer,
                                                 std::optional<void*> after_stream) {
  std::vector<PlannedOp> planned(ops.size());
  std::shared_ptr<Transfer> t(new Transfer());
  for (size_t i = 0; i < ops.size(); ++i) {
    const TransferOp& op = ops[i];
    planned[i] = PlannedOp{op.src.get(), op.src_offset, op.dst.get(), op.dst_offset, op.nbytes, i};
  }
  t->runs_ = plan(planned, &t->on_cuda_, &t->src_device_, &t->dst_device_);
  // Keep each distinct region once.
  for (const TransferOp& op : ops) {
    for (const auto* r : {&op.src, &op.dst}) {
      const bool seen = std::any_of(t->regions_.begin(), t->regions_.end(),
                                    [&](const std::shared_ptr<Region>& x) { return x == *r; });
      if (!seen) t->regions_.push_back(*r);
    }
  }
  t->num_ops_ = ops.size();
  if (peer == 0 && !ops.empty() && ops.front().dst) peer = ops.front().dst->id();
  return start(std::move(t), peer, after_stream);
}

std::shared_ptr<Transfer> TransferEngine::submit_blocks(
    const std::shared_ptr<Region>& src, const std::shared_ptr<Region>& dst,
    const uint64_t* src_offsets, const uint64_t* dst_offsets, const uint64_t* sizes,
    uint64_t uniform_nbytes, size_t n, uint64_t peer, std::optional<void*> after_stream) {
  EPDRT_ASSERT(src && dst, "submit_blocks needs a source and a destination region");
  EPDRT_ASSERT(n == 0 || (src_offsets != nullptr && dst_offsets != nullptr),
               "submit_blocks: offsets are null");
  std::vector<PlannedOp> planned(n);
  for (size_t i = 0; i < n; ++i) {
    planned[i] = PlannedOp{src.get(),
                           src_offsets[i],
                           dst.get(),
                           dst_offsets[i],
                           sizes != nullptr ? sizes[i] : uniform_nbytes,
                           i};
  }
  std::shared_ptr<Transfer> t(new Transfer());
  t->runs_ = plan(planned, &t->on_cuda_, &t->src_device_, &t->dst_device_);
  t->regions_ = {src};
  if (dst != src) t->regions_.push_back(dst);
  t->num_ops_ = n;
  return start(std::move(t), peer != 0 ? peer : dst->id(), after_stream);
}

std::shared_ptr<Transfer> TransferEngine::start(std::shared_ptr<Transfer> t, uint64_t peer,
                                                std::optional<void*> after_stream) {
  t->nbytes_ = 0;
  for (const CopyOp& run : t->runs_) t->nbytes_ += run.nbytes;
  t->notify_fd_ = completion_fd_;
  if (t->runs_.empty()) {
    t->on_cuda_ = false;
    t->state_.store(static_cast<int32_t>(TransferState::kDone));
    signal_fd(completion_fd_);
    return t;
  }
  if (t->on_cuda_) {
    start_cuda(t, peer, after_stream);
  } else {
    start_cpu(t);
  }
  return t;
}

void TransferEngine::start_cpu(const std::shared_ptr<Transfer>& t) {
  if (t->nbytes_ <= inline_bytes_) {
    t->path_ = "host-inline";
    t->chunks_left_.store(1, std::memory_order_relaxed);
    copy_chunk(*t, 0, t->runs_.size());
    return;
  }
  t->path_ = "host-threads";
  const uint64_t by_size = (t->nbytes_ + kMinChunkBytes - 1) / kMinChunkBytes;
  const size_t parts =
      static_cast<size_t>(std::clamp<uint64_t>(by_size, 1, static_cast<uint64_t>(workers_.size())));
  const std::vector<size_t> bounds = split_evenly(t->runs_, t->nbytes_, parts);
  t->chunks_left_.store(static_cast<int32_t>(parts), std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t p = 0; p < parts; ++p) queue_.push_back(Chunk{t, bounds[p], bounds[p + 1]});
  }
  if (parts == 1) {
    cv_.notify_one();
  } else {
    cv_.notify_all();
  }
}

void TransferEngine::worker_loop() {
  for (;;) {
    Chunk chunk;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      // Invariant: the queue is drained before the workers stop, so every Transfer finishes.
      if (queue_.empty()) return;
      chunk = std::move(queue_.front());
      queue_.pop_front();
    }
    copy_chunk(*chunk.transfer, chunk.begin, chunk.end);
  }
}

void TransferEngine::copy_chunk(Transfer& t, size_t begin, size_t end) {
  try {
    block_copy_host(t.runs_.data() + begin, end - begin, 1);
  } catch (const std::exception& e) {
    t.fail(detail::concat("host copy failed: ", e.what()));
  }
  t.finish_chunk();
}

#ifdef EPDRT_WITH_CUDA

void* TransferEngine::acquire_pinned(size_t bytes, size_t* capacity) {
  auto it = pinned_pool_.lower_bound(bytes);
  if (it != pinned_pool_.end()) {
    void* p = it->second;
    *capacity = it->first;
    pinned_pool_.erase(it);
    return p;
  }
  size_t cap = 4096;
  while (cap < bytes) cap *= 2;
  void* p = nullptr;
  check_cuda(cudaMallocHost(&p, cap), "cudaMallocHost");
  *capacity = cap;
  return p;
}

void TransferEngine::reap_cuda() {
  auto finished = [](const std::shared_ptr<Transfer>& x) { return x->done(); };
  auto first = std::stable_partition(inflight_cuda_.begin(), inflight_cuda_.end(),
                                     [&](const auto& x) { return !finished(x); });
  for (auto it = first; it != inflight_cuda_.end(); ++it) {
    Transfer& t = **it;
    if (t.pinned_ops_ != nullptr) pinned_pool_.emplace(t.pinned_bytes_, t.pinned_ops_);
    t.pinned_ops_ = nullptr;
  }
  inflight_cuda_.erase(first, inflight_cuda_.end());
}

void* TransferEngine::record_producer(void* stream) {
  // The handle may come from another copy of the CUDA runtime (torch links its own shared
  // cudart; the core links cudart statically): streams are driver objects of the device's
  // primary context, which every runtime in the process shares, so it names the same stream here.
  const auto producer = static_cast<cudaStream_t>(stream);
  int device = 0;
  check_cuda(cudaStreamGetDevice(producer, &device), "cudaStreamGetDevice (after_stream)");
  auto it = producer_events_.find(device);
  if (it == producer_events_.end()) {
    DeviceGuard guard(device);
    cudaEvent_t event = nullptr;
    check_cuda(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreate");
    it = producer_events_.emplace(device, event).first;
  }
  const auto event = static_cast<cudaEvent_t>(it->second);
  check_cuda(cudaEventRecord(event, producer), "cudaEventRecord (after_stream)");
  return event;
}

CopyPath TransferEngine::resolve_copy_path(int32_t src, int32_t dst) {
  const auto key = std::make_pair(src, dst);
  const auto it = copy_paths_.find(key);
  if (it != copy_paths_.end()) return it->second;
  int can_access = 0;
  if (src != dst) {
    check_cuda(cudaDeviceCanAccessPeer(&can_access, dst, src), "cudaDeviceCanAccessPeer");
  }
  const CopyPath path = choose_copy_path(src, dst, can_access != 0);
  if (path == CopyPath::kPeerAccess) {
    // Peer access belongs to the process: another engine, a region opened with
    // cudaIpcMemLazyEnablePeerAccess or torch may have enabled it already.
    const cudaError_t err = cudaDeviceEnablePeerAccess(src, 0);
    if (err == cudaErrorPeerAccessAlreadyEnabled) {
      cudaGetLastError();
    } else {
      check_cuda(err, "cudaDeviceEnablePeerAccess");
    }
  }
  copy_paths_.emplace(key, path);
  return path;
}

void TransferEngine::start_cuda(const std::shared_ptr<Transfer>& t, uint64_t peer,
                                std::optional<void*> after_stream) {
  std::lock_guard<std::mutex> lock(cuda_mu_);
  // Recorded before the copy device becomes current: a "current device" handle (0,
  // cudaStreamLegacy, cudaStreamPerThread) means the caller's device.
  void* producer_done = after_stream ? record_producer(*after_stream) : nullptr;
  DeviceGuard guard(t->dst_device_);
  reap_cuda();
  const CopyPath path = resolve_copy_path(t->src_device_, t->dst_device_);
  t->path_ = path == CopyPath::kSameDevice   ? "cuda-same-device"
             : path == CopyPath::kPeerAccess ? "cuda-peer-access"
                                             : "cuda-peer-memcpy";
  // One stream per (peer, device): a peer's transfers run in order, peers overlap.
  const uint64_t key = peer * 31 + static_cast<uint64_t>(t->dst_device_);
  auto it = streams_.find(key);
  if (it == streams_.end()) {
    cudaStream_t s = nullptr;
    check_cuda(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
    it = streams_.emplace(key, s).first;
  }
  cudaStream_t stream = static_cast<cudaStream_t>(it->second);
  if (producer_done != nullptr) {
    check_cuda(cudaStreamWaitEvent(stream, static_cast<cudaEvent_t>(producer_done), 0),
               "cudaStreamWaitEvent (after_stream)");
  }
  bool launched = false;
  try {
    const size_t n = t->runs_.size();
    if (path == CopyPath::kPeerMemcpy) {
      for (const CopyOp& run : t->runs_) {
        check_cuda(cudaMemcpyPeerAsync(run.dst, t->dst_device_, run.src, t->src_device_, run.nbytes,
                                       stream),
                   "cudaMemcpyPeerAsync");
        launched = true;
      }
    } else if (n <= kMaxSingleCopies) {
      for (const CopyOp& run : t->runs_) {
        check_cuda(cudaMemcpyAsync(run.dst, run.src, run.nbytes, cudaMemcpyDefault, stream),
                   "cudaMemcpyAsync");
        launched = true;
      }
    } else {
      // Many runs: one block-copy kernel. Its op list goes up through a pinned host array (the
      // upload is then truly asynchronous) into stream-ordered device memory freed after it.
      const size_t bytes = n * sizeof(CopyOp);
      t->pinned_ops_ = acquire_pinned(bytes, &t->pinned_bytes_);
      std::memcpy(t->pinned_ops_, t->runs_.data(), bytes);
      void* ops_device = nullptr;
      check_cuda(cudaMallocAsync(&ops_device, bytes, stream), "cudaMallocAsync");
      launched = true;
      check_cuda(cudaMemcpyAsync(ops_device, t->pinned_ops_, bytes, cudaMemcpyHostToDevice, stream),
                 "cudaMemcpyAsync");
      uint64_t max_run = 0;
      for (const CopyOp& run : t->runs_) max_run = std::max(max_run, run.nbytes);
      block_copy_cuda(static_cast<const CopyOp*>(ops_device), n, stream, max_run);
      check_cuda(cudaFreeAsync(ops_device, stream), "cudaFreeAsync");
    }
    cudaEvent_t event = nullptr;
    check_cuda(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreate");
    t->event_ = event;
    check_cuda(cudaEventRecord(event, stream), "cudaEventRecord");
    check_cuda(cudaLaunchHostFunc(stream, signal_completion, &completion_fd_),
               "cudaLaunchHostFunc");
  } catch (...) {
    // Nothing may still read or write the regions once the caller sees the error.
    if (launched) cudaStreamSynchronize(stream);
    cudaGetLastError();
    if (t->pinned_ops_ != nullptr) pinned_pool_.emplace(t->pinned_bytes_, t->pinned_ops_);
    t->pinned_ops_ = nullptr;
    throw;
  }
  inflight_cuda_.push_back(t);
}

#else

void TransferEngine::start_cuda(const std::shared_ptr<Transfer>&, uint64_t, std::optional<void*>) {
  throw CudaUnavailable("epdrt was built without CUDA (rebuild with EPDRT_CUDA=ON)");
}

#endif  // EPDRT_WITH_CUDA

}  // namespace epdrt
