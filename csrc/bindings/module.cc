// SPDX-License-Identifier: Apache-2.0
// epdrt._core: one bind_<subsystem> call per subsystem.
#include <pybind11/pybind11.h>

#include "bindings.h"

PYBIND11_MODULE(_core, m) {
  m.doc() = "epdrt C++ core: block pools and memory regions";
  epdrt::bindings::bind_errors(m);
  epdrt::bindings::bind_block_pool(m);
  epdrt::bindings::bind_region(m);
  epdrt::bindings::bind_transfer(m);
  epdrt::bindings::bind_kernels(m);
}
