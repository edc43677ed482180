"""Extension list and build knobs only; metadata lives in pyproject.toml.

Knobs (environment variables):
  PROXY_DEBUG=1     build the core with assertions and without optimisation
  PROXY_ANNOTATE=1  write Cython's annotated HTML next to the sources
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("PROXY_DEBUG") == "1"

compile_args = ["-O0", "-g", "-UNDEBUG"] if DEBUG else ["-O2"]

extensions = [
    Extension(
        "proxy._splice",
        ["proxy/_splice.pyx"],
        libraries=["ssl", "crypto", "pthread"],
        extra_compile_args=compile_args,
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
