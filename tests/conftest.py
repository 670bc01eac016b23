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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """``tiny_model_dir(arch)``: a tiny random-weight model directory, made once per session."""
    from epdrt.models import make_tiny_model

    made: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in made:
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            make_tiny_model(path, arch, seed=0)
            made[arch] = str(path)
        return made[arch]

    return get
