// SPDX-License-Identifier: Apache-2.0
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <vector>

#include "bindings.h"
#include "epdrt/block_pool.h"
#include "epdrt/common.h"

namespace py = pybind11;

namespace epdrt::bindings {
namespace {

// Python keys: an int (signed or unsigned 64-bit, kept as its 64-bit pattern) or bytes (1 to
// 64, the same key as the C API's). Ints and bytes never match each other (BlockKey::Kind).
BlockKey to_key(py::handle obj) {
  if (PyLong_Check(obj.ptr()) && !PyBool_Check(obj.ptr())) {
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(obj.ptr(), &overflow);
    uint64_t bits = static_cast<uint64_t>(v);
    if (overflow > 0) {
      bits = PyLong_AsUnsignedLongLong(obj.ptr());
      if (PyErr_Occurred()) {
        PyErr_Clear();
        throw InvalidArgument("an int key must fit in 64 bits");
      }
    } else if (overflow < 0) {
      throw InvalidArgument("an int key must fit in 64 bits");
    }
    return BlockKey::from_int(bits);
  }
  if (PyBytes_Check(obj.ptr())) {
    return BlockKey::from_bytes(PyBytes_AS_STRING(obj.ptr()),
                                static_cast<size_t>(PyBytes_GET_SIZE(obj.ptr())));
  }
  throw py::type_error(std::string("a block key must be int or bytes, not ") +
                       Py_TYPE(obj.ptr())->tp_name);
}

// Converts a sequence of ints to block ids without the generic STL caster's overhead.
std::vector<int32_t> to_ids(py::handle seq) {
  py::object fast = py::reinterpret_steal<py::object>(
      PySequence_Fast(seq.ptr(), "ids must be a sequence of ints"));
  if (!fast) throw py::error_already_set();
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast.ptr());
  PyObject** items = PySequence_Fast_ITEMS(fast.ptr());
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    const long v = PyLong_AsLong(items[i]);
    if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
    EPDRT_ASSERT(v >= INT32_MIN && v <= INT32_MAX, "block id ", v, " is out of range");
    ids[static_cast<size_t>(i)] = static_cast<int32_t>(v);
  }
  return ids;
}

py::list to_list(const std::vector<int32_t>& ids) {
  py::list out(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(i), PyLong_FromLong(ids[i]));
  }
  return out;
}

}  // namespace

void bind_block_pool(py::module_& m) {
  // NOTE: methods keep the GIL: each takes well under a microsecond, less than a GIL release.
  py::class_<BlockPool>(m, "BlockPool", R"doc(
Fixed-size block bookkeeping: ids in [0, num_blocks), reference counts, an LRU free queue
and a content-key index. O(1) per block; thread-safe. Keys are int (64-bit) or bytes (1..64).

Failed calls change nothing: allocate raises epdrt.PoolExhausted when too few blocks are
free; free/incref/commit raise ValueError (epdrt.InvalidArgument) for a bad id.
)doc")
      .def(py::init<int32_t>(), py::arg("num_blocks"))
      .def(
          "allocate",
          [](BlockPool& p, int32_t n) {
            std::vector<int32_t> ids;
            p.allocate(n, ids);
            return to_list(ids);
          },
          py::arg("n"), "Takes n blocks (reference count 1), oldest-freed first; all or nothing.")
      .def(
          "free",
          [](BlockPool& p, py::handle ids) {
            const std::vector<int32_t> v = to_ids(ids);
            p.free(v.data(), v.size());
          },
          py::arg("ids"),
          "Drops one reference per id; blocks reaching 0 join the back of the free queue.")
      .def(
          "incref",
          [](BlockPool& p, py::handle ids) {
            const std::vector<int32_t> v = to_ids(ids);
            p.incref(v.data(), v.size());
          },
          py::arg("ids"), "Adds one reference per id (each must be in use).")
      .def(
          "commit",
          [](BlockPool& p, int32_t id, py::handle key) { return p.commit(id, to_key(key)); },
          py::arg("id"), py::arg("key"),
          "Records key as block id's content; False if another block already holds it.")
      .def(
          "lookup",
          [](BlockPool& p, py::handle key) -> py::object {
            const std::optional<int32_t> id = p.lookup(to_key(key));
            if (!id) return py::none();
            return py::int_(*id);
          },
          py::arg("key"), "The block holding key with one more reference, or None.")
      .def(
          "lookup_many",
          [](BlockPool& p, py::handle keys) {
            py::object fast = py::reinterpret_steal<py::object>(
                PySequence_Fast(keys.ptr(), "keys must be a sequence"));
            if (!fast) throw py::error_already_set();
            const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast.ptr());
            PyObject** items = PySequence_Fast_ITEMS(fast.ptr());
            std::vector<BlockKey> parsed;
            parsed.reserve(static_cast<size_t>(n));
            for (Py_ssize_t i = 0; i < n; ++i) parsed.push_back(to_key(items[i]));
            std::vector<int32_t> ids(parsed.size());
            p.lookup_many(parsed.data(), parsed.size(), ids.data());
            py::list out(static_cast<size_t>(n));
            for (Py_ssize_t i = 0; i < n; ++i) {
              const int32_t id = ids[static_cast<size_t>(i)];
              PyList_SET_ITEM(out.ptr(), i, id >= 0 ? PyLong_FromLong(id) : Py_NewRef(Py_None));
            }
            return out;
          },
          py::arg("keys"), "lookup() of each key in order; one call for many keys.")
      .def(
          "commit_many",
          [](BlockPool& p, py::handle ids, py::handle keys) {
            const std::vector<int32_t> v = to_ids(ids);
            py::object fast = py::reinterpret_steal<py::object>(
                PySequence_Fast(keys.ptr(), "keys must be a sequence"));
            if (!fast) throw py::error_already_set();
            EPDRT_ASSERT(static_cast<size_t>(PySequence_Fast_GET_SIZE(fast.ptr())) == v.size(),
                         "commit_many needs one key per id");
            PyObject** items = PySequence_Fast_ITEMS(fast.ptr());
            std::vector<BlockKey> parsed;
            parsed.reserve(v.size());
            for (size_t i = 0; i < v.size(); ++i) parsed.push_back(to_key(items[i]));
            std::unique_ptr<bool[]> committed(new bool[v.size()]);
            p.commit_many(v.data(), parsed.data(), v.size(), committed.get());
            py::list out(v.size());
            for (size_t i = 0; i < v.size(); ++i) {
              PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(i),
                              Py_NewRef(committed[i] ? Py_True : Py_False));
            }
            return out;
          },
          py::arg("ids"), py::arg("keys"),
          "commit() of each (id, key) pair; all ids and keys are checked before any commit.")
      .def("ref_count", &BlockPool::ref_count, py::arg("id"))
      .def(
          "free_queue", [](const BlockPool& p) { return to_list(p.free_queue()); },
          "Free block ids, next to be allocated first (O(num_free)).")
      .def_property_readonly("num_blocks", &BlockPool::num_blocks)
      .def_property_readonly("num_free", [](const BlockPool& p) { return p.stats().num_free; })
      .def_property_readonly("num_used",
                             [](const BlockPool& p) {
                               const BlockPoolStats s = p.stats();
                               return s.num_blocks - s.num_free;
                             })
      .def_property_readonly("num_cached", [](const BlockPool& p) { return p.stats().num_cached; })
      .def_property_readonly("hits", [](const BlockPool& p) { return p.stats().hits; })
      .def_property_readonly("misses", [](const BlockPool& p) { return p.stats().misses; })
      .def_property_readonly("evictions", [](const BlockPool& p) { return p.stats().evictions; })
      .def("__repr__", [](const BlockPool& p) {
        const BlockPoolStats s = p.stats();
        return detail::concat("BlockPool(num_blocks=", s.num_blocks, ", num_free=", s.num_free,
                              ", num_cached=", s.num_cached, ")");
      });
}

}  // namespace epdrt::bindings
