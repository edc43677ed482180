"""A drop-in Python replacement for Google's alloydb-auth-proxy."""

from __future__ import annotations

__version__ = "0.1.0"

#: The Go proxy release whose command line, logs and exit codes we mirror.
GO_PROXY_VERSION = "1.15.2"

_LAZY = {
    "Proxy": ("proxy.inprocess", "Proxy"),
    "ListenerInfo": ("proxy.inprocess", "ListenerInfo"),
    "ConfigError": ("proxy.errors", "BadCommandError"),
    "DialError": ("proxy.errors", "DialError"),
}


def __getattr__(name: str) -> object:
    # Imported on first use: the command line never pays for the in-process API.
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'proxy' has no attribute {name!r}")
