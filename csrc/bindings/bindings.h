// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <pybind11/pybind11.h>

namespace epdrt::bindings {

// Maps core exceptions to the classes of epdrt.errors and adds build information.
void bind_errors(pybind11::module_& m);
void bind_block_pool(pybind11::module_& m);
void bind_region(pybind11::module_& m);
void bind_transfer(pybind11::module_& m);
void bind_kernels(pybind11::module_& m);

}  // namespace epdrt::bindings
