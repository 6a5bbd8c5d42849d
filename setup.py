"""Builds the C++ sources under csrc/ when there are any; VR1FAST_SKIP_CSRC=1 skips them.

Everything else (metadata, dependencies) lives in pyproject.toml.
"""
import os
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent


def _ext_modules():
    sources = sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc").glob("*.cpp"))
    if not sources or os.environ.get("VR1FAST_SKIP_CSRC", "0") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext = CppExtension("vr1fast._C", sources, extra_compile_args=["-O3", "-std=c++17"])
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
