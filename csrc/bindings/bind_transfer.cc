// SPDX-License-Identifier: Apache-2.0
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "bindings.h"
#include "epdrt/common.h"
#include "epdrt/notice_channel.h"
#include "epdrt/region.h"
#include "epdrt/transfer_engine.h"

namespace py = pybind11;

namespace epdrt::bindings {
namespace {

// Non-negative 64-bit integers from a 1-D int64/uint64 buffer (numpy array, memoryview) or a
// sequence of ints.
std::vector<uint64_t> to_u64(py::handle obj, const char* name) {
  std::vector<uint64_t> out;
  if (PyObject_CheckBuffer(obj.ptr())) {
    const py::buffer_info info = py::reinterpret_borrow<py::buffer>(obj).request();
    const bool int64 =
        info.itemsize == 8 && (info.format == "q" || info.format == "l" || info.format == "Q" ||
                               info.format == "L" || info.format == "<q" || info.format == "<i8");
    EPDRT_ASSERT(int64 && info.ndim == 1, name, " must be a 1-D int64 array, got format '",
                 info.format, "' with ", info.ndim, " dimension(s)");
    EPDRT_ASSERT(info.strides[0] == 8 || info.shape[0] <= 1, name, " must be contiguous");
    const bool is_signed =
        info.format.back() == 'q' || info.format.back() == 'l' || info.format == "<i8";
    out.resize(static_cast<size_t>(info.shape[0]));
    std::memcpy(out.data(), info.ptr, out.size() * 8);
    if (is_signed) {
      for (size_t i = 0; i < out.size(); ++i) {
        EPDRT_ASSERT(static_cast<int64_t>(out[i]) >= 0, name, "[", i, "] is negative");
      }
    }
    return out;
  }
  py::object fast = py::reinterpret_steal<py::object>(
      PySequence_Fast(obj.ptr(), "expected a sequence of ints or an int64 array"));
  if (!fast) throw py::error_already_set();
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast.ptr());
  PyObject** items = PySequence_Fast_ITEMS(fast.ptr());
  out.resize(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    const long long v = PyLong_AsLongLong(items[i]);
    if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
    EPDRT_ASSERT(v >= 0, name, "[", i, "] is negative (", v, ")");
    out[static_cast<size_t>(i)] = static_cast<uint64_t>(v);
  }
  return out;
}

uint64_t non_negative(long long v, const char* what, size_t i) {
  EPDRT_ASSERT(v >= 0, "transfer op ", i, ": ", what, " is negative (", v, ")");
  return static_cast<uint64_t>(v);
}

// A raw cudaStream_t from Python (an int such as torch.cuda.current_stream().cuda_stream), or
// nullopt for None. 0 is the legacy default stream, not "none".
std::optional<void*> stream_handle(std::optional<uintptr_t> handle) {
  if (!handle) return std::nullopt;
  return reinterpret_cast<void*>(*handle);
}

const char* copy_path_name(CopyPath p) {
  switch (p) {
    case CopyPath::kSameDevice:
      return "same_device";
    case CopyPath::kPeerAccess:
      return "peer_access";
    case CopyPath::kPeerMemcpy:
      return "peer_memcpy";
  }
  return "unknown";
}

const char* state_name(TransferState s) {
  switch (s) {
    case TransferState::kPending:
      return "pending";
    case TransferState::kDone:
      return "done";
    case TransferState::kFailed:
      return "failed";
  }
  return "unknown";
}

}  // namespace

void bind_transfer(py::module_& m) {
  // Registered after bind_errors' translator, so it is tried first.
  static const py::handle errors = py::module_::import("epdrt.errors").release();
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const TransferFailed& e) {
      PyErr_SetString(errors.attr("TransferError").ptr(), e.what());
    }
  });

  m.def(
      "choose_copy_path",
      [](int32_t src_device, int32_t dst_device, bool can_access_peer) {
        return copy_path_name(choose_copy_path(src_device, dst_device, can_access_peer));
      },
      py::arg("src_device"), py::arg("dst_device"), py::arg("can_access_peer"),
      "How the engine copies between CUDA devices src_device -> dst_device (ordinals), given\n"
      "cudaDeviceCanAccessPeer(dst_device, src_device): 'same_device', 'peer_access' or\n"
      "'peer_memcpy'.");

  py::class_<Transfer, std::shared_ptr<Transfer>>(m, "TransferHandle", R"doc(
One submitted batch of copies (see TransferEngine.submit). Thread-safe.
)doc")
      .def("done", &Transfer::done, "True once the copies finished or failed; never blocks.")
      .def(
          "wait",
          [](Transfer& t, std::optional<double> timeout) {
            TransferState s;
            {
              py::gil_scoped_release release;
              s = t.wait(timeout ? *timeout : -1.0);
            }
            if (s == TransferState::kFailed) throw TransferFailed(t.error());
            return s == TransferState::kDone;
          },
          py::arg("timeout") = py::none(),
          "Blocks (GIL released) until done: True; False when `timeout` seconds pass first.\n"
          "Raises epdrt.TransferError when the copies failed.")
      .def_property_readonly("state", [](Transfer& t) { return state_name(t.state()); })
      .def_property_readonly("error", &Transfer::error)
      .def_property_readonly("nbytes", &Transfer::nbytes)
      .def_property_readonly("num_ops", &Transfer::num_ops)
      .def_property_readonly("num_runs", &Transfer::num_runs)
      .def_property_readonly("on_cuda", &Transfer::on_cuda)
      .def_property_readonly("path", [](const Transfer& t) { return std::string(t.path()); })
      .def("release", &Transfer::release,
           "Drops the region references of a finished transfer (no-op while pending).");

  py::class_<TransferEngine, std::shared_ptr<TransferEngine>>(m, "TransferEngine", R"doc(
Executes batches of region-to-region copies asynchronously (CPU worker threads, or one CUDA
stream per peer). See epdrt.TransferEngine for the documented Python API.
)doc")
      .def(py::init<int, uint64_t>(), py::arg("num_threads") = 0,
           py::arg("inline_bytes") = TransferEngine::kInlineBytes)
      .def_property_readonly("inline_bytes", &TransferEngine::inline_bytes)
      .def(
          "submit",
          [](TransferEngine& e, py::handle ops, uint64_t peer,
             std::optional<uintptr_t> after_stream) {
            py::object fast = py::reinterpret_steal<py::object>(PySequence_Fast(
                ops.ptr(), "ops must be a sequence of (src, src_offset, dst, dst_offset, nbytes)"));
            if (!fast) throw py::error_already_set();
            const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast.ptr());
            PyObject** items = PySequence_Fast_ITEMS(fast.ptr());
            std::vector<TransferOp> parsed(static_cast<size_t>(n));
            for (Py_ssize_t i = 0; i < n; ++i) {
              const auto idx = static_cast<size_t>(i);
              const auto tup = py::reinterpret_borrow<py::tuple>(items[i]);
              EPDRT_ASSERT(tup.size() == 5, "transfer op ", idx,
                           " must be (src, src_offset, dst, dst_offset, nbytes)");
              TransferOp& op = parsed[idx];
              op.src = tup[0].cast<std::shared_ptr<Region>>();
              op.src_offset = non_negative(tup[1].cast<long long>(), "src_offset", idx);
              op.dst = tup[2].cast<std::shared_ptr<Region>>();
              op.dst_offset = non_negative(tup[3].cast<long long>(), "dst_offset", idx);
              op.nbytes = non_negative(tup[4].cast<long long>(), "nbytes", idx);
            }
            return e.submit(parsed, peer, stream_handle(after_stream));
          },
          py::arg("ops"), py::arg("peer") = 0, py::arg("after_stream") = py::none(),
          "Validates every op (nothing is copied when one is invalid) and starts the copies;\n"
          "CUDA copies start after the work enqueued so far on after_stream (a cudaStream_t).")
      .def(
          "submit_blocks",
          [](TransferEngine& e, const std::shared_ptr<Region>& src,
             const std::shared_ptr<Region>& dst, py::handle src_offsets, py::handle dst_offsets,
             py::handle nbytes, uint64_t peer, std::optional<uintptr_t> after_stream) {
            const std::vector<uint64_t> so = to_u64(src_offsets, "src_offsets");
            const std::vector<uint64_t> d = to_u64(dst_offsets, "dst_offsets");
            EPDRT_ASSERT(so.size() == d.size(), "src_offsets has ", so.size(),
                         " entries, dst_offsets ", d.size());
            if (PyLong_Check(nbytes.ptr())) {
              const long long each = nbytes.cast<long long>();
              EPDRT_ASSERT(each >= 0, "nbytes is negative (", each, ")");
              return e.submit_blocks(src, dst, so.data(), d.data(), nullptr,
                                     static_cast<uint64_t>(each), so.size(), peer,
                                     stream_handle(after_stream));
            }
            const std::vector<uint64_t> sizes = to_u64(nbytes, "nbytes");
            EPDRT_ASSERT(sizes.size() == so.size(), "nbytes has ", sizes.size(),
                         " entries, the offsets ", so.size());
            return e.submit_blocks(src, dst, so.data(), d.data(), sizes.data(), 0, so.size(), peer,
                                   stream_handle(after_stream));
          },
          py::arg("src"), py::arg("dst"), py::arg("src_offsets"), py::arg("dst_offsets"),
          py::arg("nbytes"), py::arg("peer") = 0, py::arg("after_stream") = py::none(),
          "Copies src[src_offsets[i]:+n] to dst[dst_offsets[i]:+n], n = nbytes (an int, or\n"
          "one per op). Offsets: int64 arrays or sequences of ints. after_stream: as submit.")
      .def_property_readonly("num_threads", &TransferEngine::num_threads)
      .def_property_readonly("completion_fd", &TransferEngine::completion_fd,
                             "eventfd made readable whenever one of this engine's transfers ends.");

  py::class_<NoticeChannel, std::shared_ptr<NoticeChannel>>(m, "NoticeChannel", R"doc(
Ordered notices to one peer over a connected SOCK_SEQPACKET unix socket, each sent by the
thread that finishes the transfer it follows (see csrc/include/epdrt/notice_channel.h).
)doc")
      .def(py::init(&NoticeChannel::create), py::arg("fd"),
           "Takes ownership of fd, a connected SOCK_SEQPACKET socket (os.dup it to keep one).")
      .def(
          "post",
          [](NoticeChannel& c, const std::shared_ptr<Transfer>& after, py::bytes notice) {
            std::string bytes = notice;
            py::gil_scoped_release release;
            c.post(after, std::move(bytes));
          },
          py::arg("after"), py::arg("notice"),
          "Queues notice (bytes) behind transfer `after` (None: no transfer) and every earlier\n"
          "notice; sends what can go now. Raises TransferError once the peer is unreachable.")
      .def("flush", &NoticeChannel::flush, py::call_guard<py::gil_scoped_release>(),
           "Sends what can go now; returns how many notices remain queued.")
      .def_property_readonly("pending", [](const NoticeChannel& c) { return c.counters().pending; })
      .def_property_readonly("error", &NoticeChannel::error)
      .def_property_readonly("notices_sent",
                             [](const NoticeChannel& c) { return c.counters().sent; })
      .def_property_readonly("notices_dropped",
                             [](const NoticeChannel& c) { return c.counters().dropped; })
      .def_property_readonly("bytes_sent",
                             [](const NoticeChannel& c) { return c.counters().bytes_sent; })
      .def_property_readonly_static("fragment_bytes",
                                    [](py::handle) { return NoticeChannel::kFragmentBytes; })
      .def("close", &NoticeChannel::close, "Closes the socket; queued notices are dropped.");
}

}  // namespace epdrt::bindings
