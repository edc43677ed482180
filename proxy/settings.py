"""Settings from the environment and ``--config-file``, merged the Go proxy's way.

Precedence: command line > ``ALLOYDB_PROXY_<FLAG>`` environment variable >
config file key (the flag's long name, kebab case) > default. Instance URIs
come whole from the first non-empty source: positional arguments, then
``ALLOYDB_PROXY_INSTANCE_URI`` (or ``_0``), ``_1``, ... up to the first gap,
then the file's ``instance-uri`` (or ``-0``), ``instance-uri-1``, ...

Quirks kept because scripts can observe them: empty environment variables
count as unset; a value set by env or file counts as "set by the user" for
conflict checks; the config file path is read from the command line only
(``ALLOYDB_PROXY_CONFIG_FILE`` has no effect). Where the Go proxy silently
ignores an invalid env or file value we ignore it too, but say so in a
warning naming the variable.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.errors import BadCommandError

ENV_PREFIX = "ALLOYDB_PROXY_"
_GO_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_GO_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def env_name(option: str) -> str:
    return ENV_PREFIX + option.upper().replace("-", "_")


def parse_go_bool(text: str) -> bool:
    if text in _GO_TRUE:
        return True
    if text in _GO_FALSE:
        return False
    raise ValueError(f"invalid syntax: {text!r}")


_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration such as ``10s``, ``1m30s`` or ``0``; ValueError otherwise."""
    if text in ("0", "+0", "-0"):
        return 0.0
    body = text.lstrip("+")
    if not body or body.startswith("-"):
        raise ValueError(f'time: invalid duration "{text}"')
    total, pos = 0.0, 0
    for match in _DURATION_PART.finditer(body):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(body):
        if re.fullmatch(r"[\d.]+", body):
            raise ValueError(f'time: missing unit in duration "{text}"')
        raise ValueError(f'time: invalid duration "{text}"')
    return total


def format_go_duration(seconds: float) -> str:
    """The reverse for whole seconds and minutes, as Go prints them (``1m30s``, ``10s``)."""
    whole = int(seconds)
    if whole != seconds:
        return f"{seconds:g}s"
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def _stringify(value: Any) -> str:
    """Go's fmt.Sprintf("%v") for the scalar types a config file can hold."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def load_config_file(path: str) -> dict[str, str]:
    """Flat ``{kebab-key (lower case): string value}`` from a TOML, YAML or JSON file."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in (".toml", ".yaml", ".yml", ".json"):
        raise BadCommandError(f"config file {path} should have extension of toml, yaml, or json")
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise BadCommandError(
            f"failed to load configuration from {path}: open {path}: {reason}"
        ) from None
    try:
        if extension == ".toml":
            import tomllib

            data: Any = tomllib.loads(raw.decode("utf-8"))
        elif extension == ".json":
            data = json.loads(raw)
        else:
            import yaml

            data = yaml.safe_load(raw) or {}
    except Exception as exc:  # each parser has its own error types
        raise BadCommandError(f"failed to load configuration from {path}: {exc}") from None
    if not isinstance(data, dict):
        raise BadCommandError(f"failed to load configuration from {path}: expected a table of keys")
    return {
        str(k).lower(): _stringify(v) for k, v in data.items() if not isinstance(v, dict | list)
    }


def _indexed(
    lookup: Callable[[str], str | None], first: str, numbered: Callable[[int], str]
) -> list[str]:
    """``first`` (else index 0), then 1, 2, ... up to the first missing index."""
    values: list[str] = []
    head = lookup(first) or lookup(numbered(0))
    if not head:
        return values
    values.append(head)
    index = 1
    while value := lookup(numbered(index)):
        values.append(value)
        index += 1
    return values


@dataclass
class Overlay:
    """What env and file contributed: new option values, and warnings to log."""

    values: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    instances: list[str] = field(default_factory=list)


def overlay(
    unset_options: Mapping[str, Callable[[str], Any]],
    *,
    environ: Mapping[str, str],
    file_values: Mapping[str, str],
    file_path: str = "",
) -> Overlay:
    """Values for the options the command line left unset.

    ``unset_options`` maps each kebab-case option name to a converter that
    raises ValueError on a bad value.
    """
    result = Overlay()
    for option, convert in unset_options.items():
        name = env_name(option)
        raw = environ.get(name) or None
        origin = f"environment variable {name}"
        if raw is None and option in file_values:
            raw = file_values[option]
            origin = f"key {option} in {file_path}"
        if raw is None:
            continue
        try:
            result.values[option] = convert(raw)
        except ValueError as exc:
            result.warnings.append(f'Ignoring invalid value "{raw}" of {origin}: {exc}')
    result.instances = _indexed(
        lambda n: environ.get(n) or None,
        ENV_PREFIX + "INSTANCE_URI",
        lambda i: f"{ENV_PREFIX}INSTANCE_URI_{i}",
    ) or _indexed(
        lambda k: file_values.get(k) or None, "instance-uri", lambda i: f"instance-uri-{i}"
    )
    return result
