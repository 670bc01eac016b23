// SPDX-License-Identifier: Apache-2.0
// Notice channel: the messages that announce finished transfers to one peer on the same host,
// sent by the engine's own threads as the copies end, with no interpreter on the path.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>

#include "epdrt/transfer_engine.h"

namespace epdrt {

// Sends notices (opaque byte strings) to one peer over a connected SOCK_SEQPACKET unix socket.
//
// A notice posted behind a transfer leaves once that transfer and every notice posted before it
// have gone: the receiver reads a notice only after the bytes it announces are visible, and in
// the order the notices were posted. It is sent by whichever thread finishes the transfer (the
// submitting thread for an inline copy, an engine worker, or the caller of flush()), so an
// inline copy's notice is on the wire when submit returns. The notice of a transfer that failed
// is dropped (the sender learns of the failure from its own Transfer).
//
// Never blocks: when the socket is full, notices wait in the queue for the next flush(). A
// notice longer than kFragmentBytes goes as several messages, each led by one byte: kMore on
// all but the last, kLast on the last (the receiver joins them).
//
// Thread-safe. The channel owns the socket; close() (or destruction) closes it, after which
// queued notices are dropped and post() fails.
class NoticeChannel : public std::enable_shared_from_this<NoticeChannel> {
 public:
  static constexpr uint8_t kLast = 0;
  static constexpr uint8_t kMore = 1;
  // Payload bytes per message: well below the socket buffer an unprivileged process can set.
  static constexpr size_t kFragmentBytes = 60 << 10;

  // Takes ownership of fd, a connected SOCK_SEQPACKET socket (made non-blocking here).
  static std::shared_ptr<NoticeChannel> create(int fd);
  ~NoticeChannel();
  NoticeChannel(const NoticeChannel&) = delete;
  NoticeChannel& operator=(const NoticeChannel&) = delete;

  // Queues notice (at least one byte) to be sent once `after` (nullptr: no transfer) has
  // finished, behind every notice posted before it, and sends what can go now. Throws
  // TransferFailed once the peer is unreachable (error()) and InvalidArgument after close().
  void post(const std::shared_ptr<Transfer>& after, std::string notice);
  // Sends every queued notice whose turn has come, until the socket is full; returns how many
  // remain queued. Never throws: a dead peer sets error() and empties the queue.
  size_t flush() noexcept;
  struct Counters {
    size_t pending = 0;       // queued, not yet sent
    uint64_t sent = 0;        // notices sent whole
    uint64_t dropped = 0;     // notices dropped because their transfer failed
    uint64_t bytes_sent = 0;  // notice bytes sent (lead bytes not counted)
  };
  Counters counters() const;
  // Why the peer cannot be reached ("" while it can).
  std::string error() const;
  void close() noexcept;

 private:
  explicit NoticeChannel(int fd) : fd_(fd) {}
  struct Entry {
    std::shared_ptr<Transfer> after;
    std::string notice;
    size_t sent = 0;  // notice bytes already sent (a fragmented notice cut short by a full socket)
  };
  // With mu_ held: sends the next message of e; false when the socket is full or broken.
  bool send_fragment(Entry& e);

  mutable std::mutex mu_;
  int fd_ = -1;
  std::deque<Entry> queue_;
  std::string error_;
  Counters counters_;  // pending is queue_.size(), filled in by counters()
};

}  // namespace epdrt
