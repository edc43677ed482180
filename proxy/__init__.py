"""A drop-in Python replacement for Google's alloydb-auth-proxy."""

from __future__ import annotations

__version__ = "0.1.0"

#: The Go proxy release whose command line, logs and exit codes we mirror.
GO_PROXY_VERSION = "1.15.2"
