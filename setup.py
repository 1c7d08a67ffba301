"""Build of the compiled core.

COPYLESS_DEBUG=1 builds it with -O0 -g and assertions; COPYLESS_ASAN=1 adds
AddressSanitizer and UBSan (run Python with LD_PRELOAD=$(gcc -print-file-name=libasan.so)).
"""

import os

from setuptools import Extension, setup

flags = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"]
link: list[str] = []
if os.environ.get("COPYLESS_DEBUG") or os.environ.get("COPYLESS_ASAN"):
    flags = [f for f in flags if f != "-O2"] + ["-O0", "-g3", "-UNDEBUG"]
if os.environ.get("COPYLESS_ASAN"):
    flags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    link += ["-fsanitize=address,undefined"]

setup(
    ext_modules=[
        Extension(
            "copyless._core",
            ["src/copyless/_core.c"],
            depends=["src/copyless/_capi.h"],
            extra_compile_args=flags,
            extra_link_args=link,
        ),
        Extension(
            "copyless._codec",
            ["src/copyless/_codec.c"],
            depends=["src/copyless/_capi.h"],
            extra_compile_args=flags,
            extra_link_args=link,
        ),
    ]
)
