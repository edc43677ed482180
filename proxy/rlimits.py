"""Open-file limit: raised from the soft to the hard limit at start-up.

Every client connection holds two fds (client and instance), so the usual
soft limit of 1024 would cap the proxy near 500 connections. The Go proxy
gets the same raise from the Go runtime (Go 1.19 and later, on Linux).
"""

from __future__ import annotations

from proxy.log import Logger


def raise_open_file_limit(log: Logger) -> None:
    try:
        import resource  # POSIX only: Windows has no such limit to raise
    except ImportError:
        return
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft == hard:
            return
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:
        log.debug("Could not raise the open file limit: %s", exc)
        return
    log.debug("Raised the open file limit from %d to %d", soft, hard)
