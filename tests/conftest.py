# SPDX-License-Identifier: Apache-2.0
import importlib.util
import os

import pytest
import torch

# Without a GPU, Triton kernels run under the interpreter; it is read when a kernel is decorated,
# so before any test imports one (epdrt.kernels imports its Triton modules on first use).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


#: Test modules that import an optional extra at the top, by the packages they need: on a host
#: without them (the GPU host has no serve extra) they are not collected, and the report's
#: header says so, instead of failing the whole run at collection.
NEEDS = {
    "test_serve.py": ("fastapi", "uvicorn", "httpx", "prometheus_client"),
    "test_bench_serve.py": ("fastapi", "uvicorn", "httpx", "prometheus_client"),
    "test_worker_restart.py": ("fastapi", "httpx"),
    "test_serve_openai.py": ("openai", "httpx", "prometheus_client"),
}
MISSING = {
    test: missing
    for test, packages in NEEDS.items()
    if (missing := [p for p in packages if importlib.util.find_spec(p) is None])
}
collect_ignore = list(MISSING)


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [f"not collected: {test} (needs {', '.join(m)})" for test, m in MISSING.items()]


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
