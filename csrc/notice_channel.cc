// SPDX-License-Identifier: Apache-2.0
// Notice channel: ordered notices over a SOCK_SEQPACKET socket, sent as transfers finish.
#include "epdrt/notice_channel.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include "epdrt/common.h"

namespace epdrt {

std::shared_ptr<NoticeChannel> NoticeChannel::create(int fd) {
  EPDRT_ASSERT(fd >= 0, "NoticeChannel needs a socket, got fd ", fd);
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0 || ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) {
    const int err = errno;
    ::close(fd);
    throw SystemError(detail::concat("NoticeChannel: fcntl: ", std::strerror(err)));
  }
  return std::shared_ptr<NoticeChannel>(new NoticeChannel(fd));
}

NoticeChannel::~NoticeChannel() { close(); }

void NoticeChannel::post(const std::shared_ptr<Transfer>& after, std::string notice) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    EPDRT_ASSERT(fd_ >= 0, "the notice channel is closed");
    EPDRT_ASSERT(!notice.empty(), "a notice needs at least one byte");
    if (!error_.empty()) throw TransferFailed(error_);
    queue_.push_back(Entry{after, std::move(notice)});
  }
  if (after != nullptr) {
    // The transfer's end sends it (and whatever queued behind it), on the finishing thread.
    std::weak_ptr<NoticeChannel> weak = weak_from_this();
    after->on_finish([weak] {
      if (auto self = weak.lock()) self->flush();
    });
  }
  flush();
}

bool NoticeChannel::send_fragment(Entry& e) {
  const size_t left = e.notice.size() - e.sent;
  const size_t n = std::min(left, kFragmentBytes);
  const uint8_t lead = n < left ? kMore : kLast;
  iovec iov[2] = {{const_cast<uint8_t*>(&lead), 1}, {e.notice.data() + e.sent, n}};
  msghdr msg{};
  msg.msg_iov = iov;
  msg.msg_iovlen = 2;
  for (;;) {
    if (::sendmsg(fd_, &msg, MSG_DONTWAIT | MSG_NOSIGNAL) >= 0) break;
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
      error_ = detail::concat("sending a notice: ", std::strerror(errno));
    }
    return false;
  }
  e.sent += n;
  counters_.bytes_sent += n;
  return true;
}

size_t NoticeChannel::flush() noexcept {
  std::lock_guard<std::mutex> lock(mu_);
  while (!queue_.empty() && fd_ >= 0 && error_.empty()) {
    Entry& e = queue_.front();
    if (e.after != nullptr) {
      const TransferState state = e.after->state();
      if (state == TransferState::kPending) break;
      if (state == TransferState::kFailed) {
        ++counters_.dropped;
        queue_.pop_front();
        continue;
      }
    }
    while (e.sent < e.notice.size() && send_fragment(e)) {
    }
    if (e.sent < e.notice.size()) break;  // the socket is full (or broken: error_)
    ++counters_.sent;
    queue_.pop_front();
  }
  if (!error_.empty()) queue_.clear();
  return queue_.size();
}

NoticeChannel::Counters NoticeChannel::counters() const {
  std::lock_guard<std::mutex> lock(mu_);
  Counters c = counters_;
  c.pending = queue_.size();
  return c;
}

std::string NoticeChannel::error() const {
  std::lock_guard<std::mutex> lock(mu_);
  return error_;
}

void NoticeChannel::close() noexcept {
  std::lock_guard<std::mutex> lock(mu_);
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  queue_.clear();
}

}  // namespace epdrt
