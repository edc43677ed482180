"""Changing the instance list of a running proxy (SIGHUP, or POST /reload).

Theory of operation: a reload reads the configuration again from the sources
the proxy started with (the same command-line arguments, the environment as
it was then, and the ``--config-file`` read afresh) and builds a new Config
through the same validation as at start-up. Only the instance list, with each
instance's query parameters, changes; every other option keeps its start-up
value (a changed one is logged as needing a restart). The listeners are then
planned as a fresh start with the new list would plan them, and compared
with the running ones: a listener whose instance and address (or socket
path) are unchanged is kept as it is, the others are closed and opened. A
closed listener only stops accepting: its open connections go on to their
natural end. A reload that cannot be applied (a bad file, a port in use)
changes nothing and says why.

This module is the pure part: what may change and what does; the listeners
are switched in ``ProxyServer.reconfigure``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from proxy.config import Config

#: Builds a new Config from the start-up sources; raises BadCommandError.
#: Returns the config and the warnings to log (ignored env/file values).
ConfigSource = Callable[[], tuple[Config, list[str]]]

# Not options of the running proxy: the list itself, and what was set where.
_NOT_COMPARED = {"instances", "set_options"}


class ReloadRefused(Exception):
    """The new configuration cannot be applied without a restart."""


def changed_options(old: Config, new: Config) -> list[str]:
    """The global options whose value differs, as flags (``--port``), in field order."""
    return [
        "--" + f.name.replace("_", "-")
        for f in dataclasses.fields(Config)
        if f.name not in _NOT_COMPARED and getattr(old, f.name) != getattr(new, f.name)
    ]


def next_config(old: Config, new: Config) -> Config:
    """``old`` with ``new``'s instance list, or ReloadRefused.

    Automatic IAM authentication picks the credentials at start-up (it is in
    effect for every instance once any instance asks for it), so a list that
    turns it on or off is refused rather than half applied.
    """
    if old.fuse:
        raise ReloadRefused(
            "under --fuse, instances are opened by name: there is no list to reload"
        )
    merged = dataclasses.replace(old, instances=new.instances)
    was = any(old.auto_iam_for(i) for i in old.instances)
    will = any(merged.auto_iam_for(i) for i in merged.instances)
    if was != will:
        state = "on" if will else "off"
        raise ReloadRefused(
            f"the new instance list turns automatic IAM authentication {state}, "
            "which needs a restart"
        )
    if not merged.instances:
        raise ReloadRefused("the new configuration has no instance")
    return merged
