"""``alloydb-emulator``: run a local AlloyDB (Admin API + instances) until stopped.

Without ``--postgres`` it starts a temporary PostgreSQL of its own, with a
database-native user (``--db-user``/``--db-password``) owning ``--db-name``
and an IAM database user for every ``--token`` email. Fault switches can be
flipped from outside with ``POST /emulator/v1/faults`` on the Admin API port.
"""

from __future__ import annotations

import json
import signal
import sys
import threading

import click

from proxy.emulator.emulator import Emulator, Principal
from proxy.emulator.instance import db_user_for
from proxy.emulator.pgcluster import PostgresCluster


def _split_token(value: str) -> tuple[str, str]:
    token, sep, email = value.partition("=")
    if not sep or not token or "@" not in email:
        raise click.BadParameter(f"expected TOKEN=EMAIL, got {value!r}")
    return token, email


@click.command("alloydb-emulator", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--instance",
    "instances",
    multiple=True,
    required=True,
    help="Instance URI projects/P/locations/R/clusters/C/instances/I (repeatable).",
)
@click.option("--public-ip", is_flag=True, help="Give every instance a public IP too.")
@click.option("--psc", is_flag=True, help="Give every instance a PSC DNS name too.")
@click.option(
    "--token",
    "tokens",
    multiple=True,
    help="TOKEN=EMAIL: a bearer token and the principal it stands for (repeatable). "
    "Without any, every token is accepted and AUTO_IAM is refused.",
)
@click.option(
    "--admin-port", type=int, default=8088, show_default=True, help="Admin API port on 127.0.0.1."
)
@click.option("--postgres", default="", help="HOST:PORT of an existing PostgreSQL to front.")
@click.option(
    "--db-user", default="app", show_default=True, help="Native user of the temporary PostgreSQL."
)
@click.option("--db-password", default="app", show_default=True, help="Its password.")
@click.option("--db-name", default="app", show_default=True, help="Database it owns.")
@click.option(
    "--state-file",
    default="",
    help="Write admin URL, instance addresses and PostgreSQL address here (JSON).",
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
    principals = {t: Principal(e) for t, e in map(_split_token, tokens)} or None
    cluster: PostgresCluster | None = None
    emu: Emulator | None = None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        if postgres:
            host, _, port = postgres.rpartition(":")
            pg_host, pg_port = host or "127.0.0.1", int(port)
        else:
            cluster = PostgresCluster().start()
            cluster.create_user(db_user, db_password)
            cluster.create_database(db_name, db_user)
            for principal in (principals or {}).values():
                iam_user = db_user_for(principal.email)
                cluster.create_iam_user(iam_user)
                cluster.psql(f'GRANT ALL ON DATABASE "{db_name}" TO "{iam_user}"')
            pg_host, pg_port = cluster.host, cluster.port
        emu = Emulator(
            postgres_host=pg_host, postgres_port=pg_port, tokens=principals, admin_port=admin_port
        )
        for uri in instances:
            emu.add_instance(uri, public_ip=public_ip, psc=psc)
        emu.start()
        state = {
            "admin_url": emu.admin_url,
            "postgres": {"host": pg_host, "port": pg_port},
            "instances": {
                i.uri: {
                    "private_ip": i.private_ip,
                    "public_ip": i.public_ip,
                    "psc_dns_name": i.psc_dns_name,
                    "psc_ip": i.psc_ip,
                }
                for i in emu.instances.values()
            },
        }
        click.echo(
            f"AlloyDB emulator: Admin API at {emu.admin_url} (use it as --alloydbadmin-api-endpoint)"
        )
        for uri, addrs in state["instances"].items():
            extra = "".join(f", {k} {v}" for k, v in addrs.items() if v and k != "private_ip")
            click.echo(f"  {uri}: private IP {addrs['private_ip']}{extra}, port 5433")
        click.echo(f"  in front of PostgreSQL at {pg_host}:{pg_port}")
        if state_file:
            with open(state_file, "w", encoding="utf-8") as fh:
                json.dump(state, fh, indent=2)
        sys.stdout.flush()
        stop.wait()
        click.echo("AlloyDB emulator: stopping")
    finally:
        if emu is not None:
            emu.stop()
        if cluster is not None:
            cluster.stop()


if __name__ == "__main__":
    main()
