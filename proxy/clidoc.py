"""The CLI reference (docs/cli.md), generated from the click commands themselves.

``python ci/gen_cli_docs.py`` writes it; a unit test fails when it is stale.
"""

from __future__ import annotations

import click

from proxy.cli import PROG, SHORT_HELP, root
from proxy.config import QUERY_PARAMETERS
from proxy.subcommands import SUBCOMMANDS

HEADER = """# `alloydb-auth-proxy` command-line reference

Generated from the code by `ci/gen_cli_docs.py`; do not edit by hand.
Flags marked (*) may also be used as instance-URI query parameters.
"""


# click's type names, spelled as the Go proxy's help spells them.
_GO_TYPES = {"text": "string", "integer": "int", "integer range": "uint", "duration": "duration"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _flag_rows(command: click.Command, with_env: bool) -> list[str]:
    ctx = click.Context(command, **command.context_settings)  # its -h, as when it runs
    head = "| flag | short | env var | type | default | meaning |"
    rule = "| --- | --- | --- | --- | --- | --- |"
    if not with_env:
        head = "| flag | short | type | default | meaning |"
        rule = "| --- | --- | --- | --- | --- |"
    rows = [head, rule]
    for param in command.get_params(ctx):
        if not isinstance(param, click.Option):
            continue
        longs = [o for o in param.opts if o.startswith("--")]
        shorts = [o for o in param.opts + param.secondary_opts if not o.startswith("--")]
        name = longs[0]
        if param.is_flag:
            kind, default = "bool", "false"
        else:
            kind = _GO_TYPES.get(param.type.name, param.type.name)
            default = "" if param.default in (None, "") else str(param.default)
        env = ""
        if with_env and name not in ("--help", "--version", "--config-file"):
            env = "`ALLOYDB_PROXY_" + name[2:].upper().replace("-", "_") + "`"
        cells = [f"`{name}`", " ".join(f"`{s}`" for s in shorts)]
        if with_env:
            cells.append(env)
        cells += [kind, f"`{default}`" if default else "", _cell(param.help or "")]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def render() -> str:
    out = [HEADER, f"## `{PROG}`", "", SHORT_HELP, "", "```", f"{PROG} instance_uri... [flags]"]
    out += ["```", ""]
    out += _flag_rows(root, with_env=True)
    out += [
        "",
        "`ALLOYDB_PROXY_CONFIG_FILE` is not read (as in the Go proxy). Instance URIs may also",
        "come from `ALLOYDB_PROXY_INSTANCE_URI`, `ALLOYDB_PROXY_INSTANCE_URI_1`, … and from",
        "the config-file keys `instance-uri`, `instance-uri-1`, … (up to the first gap).",
        "",
        "### Instance-URI query parameters",
        "",
        "| parameter | meaning |",
        "| --- | --- |",
    ]
    out += [f"| `{name}` | {_cell(text)} |" for name, text in QUERY_PARAMETERS.items()]
    for name, command in SUBCOMMANDS.items():
        out += ["", f"## `{PROG} {name}`", "", command.help or "", ""]
        out += _flag_rows(command, with_env=False)
    out += ["", "Subcommands read no environment variables or config file, as in the Go proxy."]
    return "\n".join(out) + "\n"
