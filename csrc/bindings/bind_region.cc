// SPDX-License-Identifier: Apache-2.0
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <string>

#include "bindings.h"
#include "epdrt/common.h"
#include "epdrt/region.h"

namespace py = pybind11;

namespace epdrt::bindings {
namespace {

py::bytes to_bytes(const DeviceUuid& uuid) {
  return py::bytes(reinterpret_cast<const char*>(uuid.data()), uuid.size());
}

}  // namespace

void bind_region(py::module_& m) {
  m.attr("REGION_DESCRIPTOR_BYTES") = kRegionDescriptorBytes;
  // The Python class epdrt.Region wraps this handle; see src/epdrt/region.py.
  py::class_<Region, std::shared_ptr<Region>>(m, "RegionHandle", py::buffer_protocol())
      .def_static(
          "create",
          [](uint64_t nbytes, int32_t device_type, int32_t device_index) {
            return Region::create(nbytes, Device{static_cast<DeviceType>(device_type), device_index});
          },
          py::arg("nbytes"), py::arg("device_type"), py::arg("device_index"))
      .def_static(
          "open",
          [](const py::bytes& descriptor, std::optional<int32_t> consumer_device) {
            const std::string d = descriptor;
            return Region::open(reinterpret_cast<const uint8_t*>(d.data()), d.size(),
                                consumer_device);
          },
          py::arg("descriptor"), py::arg("consumer_device") = py::none())
      .def_static(
          "parse",
          [](const py::bytes& descriptor) {
            const std::string raw = descriptor;
            const RegionDescriptor d =
                RegionDescriptor::parse(reinterpret_cast<const uint8_t*>(raw.data()), raw.size());
            py::dict out;
            out["device_type"] = static_cast<int32_t>(d.device.type);
            out["device_index"] = d.device.index;
            out["device_uuid"] = to_bytes(d.device_uuid);
            out["nbytes"] = d.nbytes;
            out["id"] = d.id;
            out["creator_pid"] = d.creator_pid;
            return out;
          },
          py::arg("descriptor"),
          "The fields of a descriptor (InvalidArgument unless well-formed); opens nothing.")
      .def("export",
           [](const Region& r) {
             const std::vector<uint8_t> d = r.export_descriptor();
             return py::bytes(reinterpret_cast<const char*>(d.data()), d.size());
           })
      .def("close", &Region::close)
      .def_property_readonly("data_ptr",
                             [](const Region& r) { return reinterpret_cast<uintptr_t>(r.data()); })
      .def_property_readonly("nbytes", &Region::nbytes)
      .def_property_readonly("device_type",
                             [](const Region& r) { return static_cast<int32_t>(r.device().type); })
      .def_property_readonly("device_index", [](const Region& r) { return r.device().index; })
      .def_property_readonly("opened_on_index", [](const Region& r) { return r.opened_on().index; })
      .def_property_readonly("device_uuid",
                             [](const Region& r) { return to_bytes(r.device_uuid()); })
      .def_property_readonly("id", &Region::id)
      .def_property_readonly("is_owner", &Region::is_owner)
      .def_property_readonly("closed", &Region::is_closed)
      // A 1-D uint8 buffer over a CPU region; consumers keep the handle (and memory) alive.
      .def_buffer([](Region& r) -> py::buffer_info {
        EPDRT_ASSERT(r.device().type == DeviceType::kCpu,
                     "only CPU regions expose the buffer protocol");
        EPDRT_ASSERT(!r.is_closed(), "the region is closed");
        return py::buffer_info(r.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(r.nbytes())}, {1});
      });
}

}  // namespace epdrt::bindings
