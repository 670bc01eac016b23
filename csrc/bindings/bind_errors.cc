// SPDX-License-Identifier: Apache-2.0
#include <pybind11/pybind11.h>

#include "bindings.h"
#include "epdrt/common.h"
#include "epdrt/region.h"

namespace py = pybind11;

namespace epdrt::bindings {

void bind_errors(py::module_& m) {
  // epdrt/__init__.py imports epdrt.errors before this module, so the import cannot cycle.
  // Leaked on purpose: a static py::object would be destroyed after the interpreter.
  static const py::handle errors = py::module_::import("epdrt.errors").release();
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const InvalidArgument& e) {
      PyErr_SetString(errors.attr("InvalidArgument").ptr(), e.what());
    } catch (const PoolExhausted& e) {
      PyErr_SetString(errors.attr("PoolExhausted").ptr(), e.what());
    } catch (const CudaUnavailable& e) {
      PyErr_SetString(errors.attr("CudaUnavailable").ptr(), e.what());
    } catch (const SystemError& e) {
      PyErr_SetString(errors.attr("RegionError").ptr(), e.what());
    } catch (const Error& e) {
      PyErr_SetString(errors.attr("EpdrtError").ptr(), e.what());
    }
  });
  m.attr("__version__") = EPDRT_VERSION;
  m.attr("cuda_compiled") = cuda_compiled();
  m.def("cuda_device_count", &cuda_device_count,
        "Number of usable CUDA devices (0 without CUDA support, a driver or a device).");
}

}  // namespace epdrt::bindings
