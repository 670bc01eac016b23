# SPDX-License-Identifier: Apache-2.0
"""The C header and libepdrt work without Python: compile tests/c/test_c_api.c and run it."""

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
