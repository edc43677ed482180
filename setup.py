"""Extension list and build knobs only; metadata lives in pyproject.toml.

Knobs (environment variables):
  PROXY_DEBUG=1     build the core with assertions and without optimisation
  PROXY_ANNOTATE=1  write Cython's annotated HTML next to the sources
  PROXY_ASAN=1      build the core with AddressSanitizer (run Python with
                    LD_PRELOAD=$(gcc -print-file-name=libasan.so) and
                    ASAN_OPTIONS=detect_leaks=0; tests/core/test_sanitizers.py
                    does this for the core tests)
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("PROXY_DEBUG") == "1"

ASAN = os.environ.get("PROXY_ASAN") == "1"

compile_args = ["-O0", "-g", "-UNDEBUG"] if DEBUG else ["-O2"]
link_args = []
if ASAN:
    compile_args = ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"]
    link_args = ["-fsanitize=address"]

extensions = [
    Extension(
        "proxy._splice",
        ["proxy/_splice.pyx"],
        libraries=["ssl", "crypto", "pthread"],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        annotate=os.environ.get("PROXY_ANNOTATE") == "1",
        compiler_directives={
            "boundscheck": DEBUG,
            "wraparound": False,
            "embedsignature": True,
        },
    )
)
