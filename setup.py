"""Extension list and build knobs only; metadata lives in pyproject.toml.

Knobs (environment variables):
  PROXY_DEBUG=1     build the core with assertions and without optimisation
  PROXY_ANNOTATE=1  write Cython's annotated HTML next to the sources
  PROXY_ASAN=1      build the core with AddressSanitizer (run Python with
                    LD_PRELOAD=$(gcc -print-file-name=libasan.so) and
                    ASAN_OPTIONS=detect_leaks=0; tests/core/test_sanitizers.py
                    does this for the core tests)
  PROXY_PURE=1      no native core: a py3-none-any wheel whose proxy runs the
                    portable data plane (proxy/portable.py)
  PROXY_OPENSSL_STATIC=DIR
                    link DIR/lib/lib{ssl,crypto}.a into the core and export
                    only PyInit__splice (ci/build_wheel.sh builds DIR)
  PROXY_LIMITED_API=1
                    build against CPython's Limited API: one cp310-abi3 wheel
                    for every CPython >= 3.10
  PROXY_PLAT_NAME=linux_aarch64
                    the wheel's platform when cross-compiling
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

PURE = os.environ.get("PROXY_PURE") == "1"
STATIC_OPENSSL = os.environ.get("PROXY_OPENSSL_STATIC")
LIMITED_API = os.environ.get("PROXY_LIMITED_API") == "1"
HERE = os.path.dirname(os.path.abspath(__file__))

libraries = ["ssl", "crypto", "pthread"]
include_dirs: list[str] = []
extra_objects: list[str] = []
if STATIC_OPENSSL:
    libraries = ["pthread"]
    include_dirs = [os.path.join(STATIC_OPENSSL, "include")]
    extra_objects = [os.path.join(STATIC_OPENSSL, "lib", f"lib{n}.a") for n in ("ssl", "crypto")]
    link_args += [
        "-Wl,--version-script=" + os.path.join(HERE, "ci", "wheel", "exports.map"),
        "-Wl,--strip-all",
    ]
define_macros = []
if LIMITED_API:
    define_macros = [("Py_LIMITED_API", "0x030A0000"), ("CYTHON_LIMITED_API", "1")]

extensions = [
    Extension(
        "proxy._splice",
        ["proxy/_splice.pyx"],
        libraries=libraries,
        include_dirs=include_dirs,
        extra_objects=extra_objects,
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        define_macros=define_macros,
        py_limited_api=LIMITED_API,
    )
]

wheel_options = {}
if LIMITED_API:
    wheel_options["py_limited_api"] = "cp310"
if os.environ.get("PROXY_PLAT_NAME"):
    wheel_options["plat_name"] = os.environ["PROXY_PLAT_NAME"]

setup(
    ext_modules=[]
    if PURE
    else cythonize(
        extensions,
        # A wheel is built from fresh C, never from a _splice.c that an
        # editable install left with other directives.
        force=bool(STATIC_OPENSSL or LIMITED_API),
        language_level=3,
        annotate=os.environ.get("PROXY_ANNOTATE") == "1",
        compiler_directives={
            "boundscheck": DEBUG,
            "wraparound": False,
            "embedsignature": True,
        },
    ),
    options={"bdist_wheel": wheel_options} if wheel_options else {},
)
