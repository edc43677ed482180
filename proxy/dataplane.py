"""Which data plane moves the bytes: the native core or the portable one.

``plane`` is ``proxy._splice`` (Cython and OpenSSL on native threads: the
binary wheel and source builds) or ``proxy.portable`` (the ``ssl`` module on
the event loop: the pure-Python wheel). Both have the same names. The choice
is made once per process, from ``ALLOYDB_AUTH_PROXY_DATA_PLANE``:

    auto      (default) native if it is installed, else portable
    native    native, or a clear error: never a silent fallback
    portable  portable, even where native is installed

It is not an ``ALLOYDB_PROXY_*`` variable on purpose: those are the
command's flags, which ``proxy.Proxy`` does not read.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import TYPE_CHECKING

from proxy.errors import ProxyError

KNOB = "ALLOYDB_AUTH_PROXY_DATA_PLANE"


class DataPlaneError(ProxyError):
    """The data plane asked for cannot run here."""


def _select() -> tuple[ModuleType | None, str, str]:
    """(module, name, error): the module is None when the choice cannot be met."""
    want = os.environ.get(KNOB, "").strip().lower() or "auto"
    if want not in ("auto", "native", "portable"):
        return None, want, f"{KNOB}={want!r}: expected auto, native or portable"
    if want != "portable":
        try:
            from proxy import _splice
        except ImportError as exc:
            if want == "native":
                return (
                    None,
                    want,
                    (
                        f"{KNOB}=native, but the native data plane is not installed here ({exc}); "
                        "install the binary wheel (Linux x86_64/aarch64, glibc 2.28 or newer), "
                        "build from source (gcc and the OpenSSL headers), or unset "
                        f"{KNOB} to use the portable one"
                    ),
                )
        else:
            return _splice, "native", ""
    from proxy import portable

    return portable, "portable", ""


_module, NAME, ERROR = _select()


def check() -> None:
    """Raise DataPlaneError if the data plane asked for cannot run (at start-up)."""
    if ERROR:
        raise DataPlaneError(ERROR)


def describe() -> str:
    """For --version and the debug log: which plane and which OpenSSL."""
    if _module is None:
        return f"no data plane ({ERROR})"
    kind = "native (Cython core)" if NAME == "native" else "portable (Python ssl module)"
    return f"{kind}, {_module.openssl_version()}"


__all__ = ["KNOB", "NAME", "DataPlaneError", "check", "describe", "plane"]

if TYPE_CHECKING:
    from proxy import _splice as plane
elif _module is not None:
    plane = _module
else:
    # Only so that modules naming plane's constants import; nothing is dialled
    # or spliced, because start-up calls check() first and fails there.
    from proxy import portable as plane
