# SPDX-License-Identifier: Apache-2.0
"""Paths and a compiler helper for C/C++ programs that use the epdrt C API (epdrt.h)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

from epdrt import _core
from epdrt.errors import EpdrtError

_PACKAGE_DIR = Path(_core.__file__).resolve().parent


def include_dir() -> Path:
    """Directory to put on the include path: ``#include <epdrt/epdrt.h>``."""
    return _PACKAGE_DIR / "include"


def library_dir() -> Path:
    """Directory holding ``libepdrt.so`` (link with ``-lepdrt``)."""
    return _PACKAGE_DIR / "lib"


def compile_c_program(source: str | os.PathLike[str], output: str | os.PathLike[str]) -> Path:
    """Compiles and links one C or C++ file against libepdrt; returns the executable's path.

    Uses ``$CC`` (default ``cc``) for ``.c`` files and ``$CXX`` (default ``c++``) otherwise;
    the executable finds the library through an rpath.
    """
    source = Path(source)
    is_c = source.suffix == ".c"
    compiler = os.environ.get("CC", "cc") if is_c else os.environ.get("CXX", "c++")
    if shutil.which(shlex.split(compiler)[0]) is None:
        raise EpdrtError(f"no C/C++ compiler found ({compiler!r}); set CC/CXX")
    std = "-std=c11" if is_c else "-std=c++17"
    lib = library_dir()
    cmd = [
        *shlex.split(compiler), std, "-O2", "-Wall", "-Wextra", "-Werror",
        f"-I{include_dir()}", str(source), "-o", str(output),
        f"-L{lib}", "-lepdrt", f"-Wl,-rpath,{lib}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise EpdrtError(f"compiling {source.name} failed:\n{' '.join(cmd)}\n{proc.stderr}")
    return Path(output)
