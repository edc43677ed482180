"""``alloydb-emulator``: run a local AlloyDB (Admin API + instances) until stopped.

Example::

    alloydb-emulator --instance projects/p/locations/r/clusters/c/instances/i \\
        --token my-token=app-sa@p.iam.gserviceaccount.com --state-file state.json
    alloydb-auth-proxy projects/p/locations/r/clusters/c/instances/i \\
        --alloydbadmin-api-endpoint http://127.0.0.1:8088 --token my-token

Without ``--postgres`` it starts a temporary PostgreSQL of its own, with a
database-native user (``--db-user``/``--db-password``) owning ``--db-name``
and an IAM database user for every ``--token`` email (``x@p.iam`` for a
service account, the full email for a person). Without any ``--token`` every
bearer token is accepted and automatic IAM login is refused.

Every instance gets its own loopback IP (127.x.y.z) and listens on port
5433; ``--public-ip`` and ``--psc`` add a public IP and a PSC DNS name (with
its own IP; ``hosts_entries`` in the state file are /etc/hosts lines for it).

The state file (JSON, written atomically once everything listens, removed on exit)::

    {"admin_url": "http://127.0.0.1:8088",
     "postgres": {"host": "127.0.0.1", "port": 39999, "temporary": true},
     "instances": {"<URI>": {"private_ip": ..., "public_ip": ..., "psc_dns_name": ...,
                             "psc_ip": ..., "uid": ...}},
     "hosts_entries": ["127.x.y.z name.alloydb.goog"]}

Control endpoints on the Admin API port (no token needed):

* ``POST /emulator/v1/faults`` with a JSON object of fault switches (names in
  ``proxy.emulator.faults``), e.g. ``{"admin_status": 503, "admin_status_count": 2}``;
  ``"instance": "<URI>"`` targets one instance, ``"clear": true`` resets first.
  Answers with the resulting switches.
* ``GET /emulator/v1/faults``: the current switches, global and per instance.
* ``GET /emulator/v1/requests``: the Admin API request log (``requests``) and
  the metadata exchanges seen (``mdx``).

It runs until SIGINT or SIGTERM, then stops everything (the temporary
PostgreSQL included) and exits 0.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
from typing import Any

import click

from proxy.emulator.emulator import Emulator
from proxy.emulator.instance import db_user_for
from proxy.emulator.pgcluster import PostgresCluster, quote_ident
from proxy.emulator.principals import Principal


def _split_token(value: str) -> tuple[str, str]:
    token, sep, email = value.partition("=")
    if not sep or not token or "@" not in email:
        raise click.BadParameter(f"expected TOKEN=EMAIL, got {value!r}", param_hint="--token")
    return token, email


def _split_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise click.BadParameter(f"expected HOST:PORT, got {value!r}", param_hint="--postgres")
    return host.strip("[]") or "127.0.0.1", int(port)


def _write_atomically(path: str, data: dict[str, Any]) -> None:
    """Readers polling for the file never see half of it."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".state-", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _prepare_database(
    cluster: PostgresCluster, principals: dict[str, Principal], user: str, password: str, db: str
) -> None:
    cluster.create_user(user, password)
    cluster.create_database(db, user)
    for principal in principals.values():
        iam_user = db_user_for(principal.email)
        cluster.create_iam_user(iam_user)
        cluster.psql(f"GRANT ALL ON DATABASE {quote_ident(db)} TO {quote_ident(iam_user)}")
        # PostgreSQL 15 no longer lets everyone create in public; IAM users may.
        cluster.psql(f"GRANT ALL ON SCHEMA public TO {quote_ident(iam_user)}", db)


@click.command("alloydb-emulator", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--instance",
    "instances",
    multiple=True,
    required=True,
    help="Instance URI projects/P/locations/R/clusters/C/instances/I (repeatable).",
)
@click.option("--public-ip", is_flag=True, help="Give every instance a public IP too.")
@click.option("--psc", is_flag=True, help="Give every instance a PSC DNS name (and IP) too.")
@click.option(
    "--token",
    "tokens",
    multiple=True,
    metavar="TOKEN=EMAIL",
    help="A bearer token and the principal it stands for (repeatable). "
    "Without any, every token is accepted and AUTO_IAM is refused.",
)
@click.option(
    "--admin-port",
    type=click.IntRange(0, 65535),
    default=8088,
    show_default=True,
    help="Admin API port on 127.0.0.1 (0 = any free port).",
)
@click.option(
    "--postgres",
    metavar="HOST:PORT",
    default="",
    help="Front this existing PostgreSQL instead of starting a temporary one.",
)
@click.option(
    "--db-user", default="app", show_default=True, help="Native user of the temporary PostgreSQL."
)
@click.option("--db-password", default="app", show_default=True, help="Its password.")
@click.option("--db-name", default="app", show_default=True, help="Database it owns.")
@click.option(
    "--state-file",
    default="",
    metavar="PATH",
    help="Write the admin URL, instance addresses and PostgreSQL address here (JSON).",
)
def main(
    instances: tuple[str, ...],
    public_ip: bool,
    psc: bool,
    tokens: tuple[str, ...],
    admin_port: int,
    postgres: str,
    db_user: str,
    db_password: str,
    db_name: str,
    state_file: str,
) -> None:
    """Run a local AlloyDB emulator (Admin API and instances) in front of PostgreSQL."""
    principals = {t: Principal(e) for t, e in map(_split_token, tokens)} or None
    pg_address = _split_hostport(postgres) if postgres else None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    cluster: PostgresCluster | None = None
    emu: Emulator | None = None
    try:
        if pg_address is None:
            cluster = PostgresCluster().start()
            _prepare_database(cluster, principals or {}, db_user, db_password, db_name)
            pg_address = (cluster.host, cluster.port)
        pg_host, pg_port = pg_address
        emu = Emulator(
            postgres_host=pg_host, postgres_port=pg_port, tokens=principals, admin_port=admin_port
        )
        for uri in instances:
            emu.add_instance(uri, public_ip=public_ip, psc=psc)
        emu.start()
        state = {
            "admin_url": emu.admin_url,
            "postgres": {"host": pg_host, "port": pg_port, "temporary": cluster is not None},
            "instances": {
                i.uri: {
                    "private_ip": i.private_ip,
                    "public_ip": i.public_ip,
                    "psc_dns_name": i.psc_dns_name,
                    "psc_ip": i.psc_ip,
                    "uid": i.uid,
                }
                for i in emu.instances.values()
            },
            "hosts_entries": emu.hosts_entries(),
        }
        if state_file:
            _write_atomically(state_file, state)
        _print_summary(emu, state, principals, cluster, db_user, db_password, db_name)
        while not stop.wait(1):  # a timed wait keeps signal handlers running promptly
            pass
        click.echo("AlloyDB emulator: stopping")
    finally:
        if emu is not None:
            emu.stop()
        if cluster is not None:
            cluster.stop()
        if state_file and os.path.exists(state_file):
            os.unlink(state_file)  # stale addresses would mislead the next reader


def _print_summary(
    emu: Emulator,
    state: dict[str, Any],
    principals: dict[str, Principal] | None,
    cluster: PostgresCluster | None,
    db_user: str,
    db_password: str,
    db_name: str,
) -> None:
    echo = click.echo
    echo(f"AlloyDB emulator: Admin API at {emu.admin_url} (use it as --alloydbadmin-api-endpoint)")
    for uri, addrs in state["instances"].items():
        echo(f"  instance {uri}")
        echo(f"    private IP {addrs['private_ip']}, port 5433")
        if addrs["public_ip"]:
            echo(f"    public IP  {addrs['public_ip']}")
        if addrs["psc_dns_name"]:
            echo(f"    PSC name   {addrs['psc_dns_name']} -> {addrs['psc_ip']} (add to /etc/hosts)")
    pg = state["postgres"]
    kind = "a temporary PostgreSQL" if cluster is not None else "PostgreSQL"
    echo(f"  in front of {kind} at {pg['host']}:{pg['port']}")
    if cluster is not None:
        echo(f"    database {db_name!r}, user {db_user!r} / password {db_password!r}")
    if principals is None:
        echo("  tokens: any bearer token is accepted (automatic IAM login is refused)")
    else:
        for token, principal in principals.items():
            echo(f"  token {token!r}: {principal.email} (IAM user {db_user_for(principal.email)})")
    echo("Press Ctrl-C (or send SIGTERM) to stop.")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
