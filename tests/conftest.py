# SPDX-License-Identifier: Apache-2.0
import os

import pytest
import torch

# Without a GPU, Triton kernels run under the interpreter; it is read when a kernel is decorated,
# so before any test imports one (epdrt.kernels imports its Triton modules on first use).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
