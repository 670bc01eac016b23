# SPDX-License-Identifier: Apache-2.0
"""The C header and libepdrt work without Python: compile tests/c/test_c_api.c and run it."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from epdrt.native import compile_c_program, include_dir, library_dir

SOURCE = Path(__file__).with_name("c") / "test_c_api.c"


def test_header_and_library_are_installed():
    assert (include_dir() / "epdrt" / "epdrt.h").is_file()
    assert (library_dir() / "libepdrt.so").is_file()


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_c_program_links_and_passes(tmp_path):
    exe = compile_c_program(SOURCE, tmp_path / "test_c_api")
    result = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all C API checks passed" in result.stdout


#: The core's sources the C API needs (no CUDA: the sanitizers run on the host build).
CORE_SOURCES = ["block_copy.cc", "block_pool.cc", "c_api.cc", "region.cc", "region_cuda.cc",
                "region_host.cc", "transfer_engine.cc"]  # fmt: skip
SANITIZERS = {"address": "-fsanitize=address,undefined", "thread": "-fsanitize=thread"}


def _sanitizer_works(cc: str, flag: str, tmp_path: Path) -> bool:
    probe = tmp_path / "probe.c"
    probe.write_text("int main(void) { return 0; }\n")
    done = subprocess.run([cc, flag, str(probe), "-o", str(tmp_path / "probe")],
                          capture_output=True, timeout=60)  # fmt: skip
    return done.returncode == 0 and subprocess.run([str(tmp_path / "probe")]).returncode == 0


@pytest.mark.parametrize("sanitizer", list(SANITIZERS))
def test_c_program_and_engine_under_sanitizers(tmp_path, sanitizer):
    """The C test program and the core it calls (block pool, regions, transfer engine with its
    worker threads), built with AddressSanitizer + UBSan, and with ThreadSanitizer: any
    report fails the run."""
    csrc = Path(__file__).resolve().parents[1] / "csrc"
    cc, cxx = shutil.which("cc"), shutil.which("c++")
    if not csrc.is_dir() or cc is None or cxx is None:
        pytest.skip("needs the source tree and a C/C++ compiler")
    flag = SANITIZERS[sanitizer]
    if not _sanitizer_works(cc, flag, tmp_path):
        pytest.skip(f"the compiler cannot build and run with {flag}")
    common = [flag, "-g", "-O1", "-fno-omit-frame-pointer", f"-I{csrc / 'include'}"]
    obj = tmp_path / "test_c_api.o"
    subprocess.run([cc, *common, "-c", str(SOURCE), "-o", str(obj)], check=True, timeout=120)
    exe = tmp_path / f"test_c_api_{sanitizer}"
    sources = [str(csrc / name) for name in CORE_SOURCES]
    build = subprocess.run(
        [cxx, "-std=c++17", *common, '-DEPDRT_VERSION="sanitized"', *sources, str(obj),
         "-lpthread", "-o", str(exe)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-4000:]
    env = {
        **os.environ,
        "ASAN_OPTIONS": "detect_leaks=1",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
        "TSAN_OPTIONS": "halt_on_error=1",
    }
    result = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr[-6000:]
    assert "all C API checks passed" in result.stdout
    assert "Sanitizer" not in result.stderr, result.stderr[-6000:]
