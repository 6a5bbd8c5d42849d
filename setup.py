"""Builds csrc/ (the C++ block manager) into ``vr1fast/_C*.so``; VR1FAST_SKIP_CSRC=1 skips it.

The library has a plain C interface (``csrc/c_api.cpp``) that ``vr1fast.rollout.block_manager`` loads with ctypes:
no torch and no Python headers, and the C++ runtime linked in statically, so one binary loads under any torch or
Python version and needs only libc. It is an optional extension: where it does not build (no C++ compiler, not
Linux), the install goes on and the Python block manager runs instead, saying so in one line.
Everything else (metadata, dependencies) lives in pyproject.toml.
"""
import os
import sys
from pathlib import Path

from setuptools import Extension, setup

HERE = Path(__file__).parent
CSRC = HERE / "csrc"


def _ext_modules() -> list:
    sources = sorted(str(p.relative_to(HERE)) for p in CSRC.glob("*.cpp"))
    if not sources or os.environ.get("VR1FAST_SKIP_CSRC", "0") == "1" or not sys.platform.startswith("linux"):
        return []
    exports = CSRC / "exports.map"
    return [Extension(
        "vr1fast._C", sources, language="c++", optional=True,
        depends=[str(p.relative_to(HERE)) for p in (*CSRC.glob("*.h"), exports)],
        extra_compile_args=["-std=c++17", "-O2", "-Wall", "-Wextra", "-fvisibility=hidden"],
        extra_link_args=["-static-libstdc++", "-static-libgcc", f"-Wl,--version-script={exports}"],
    )]


setup(ext_modules=_ext_modules())
