"""``alloydb-auth-proxy wait``, ``shutdown``, ``completion``: helpers for another process.

``wait`` polls ``/startup`` of a running proxy once a second (for init
containers and scripts); ``shutdown`` posts ``/quitquitquit`` to its admin
server (for preStop hooks). Like the Go proxy, neither reads environment
variables or config files. Failures print ``Error: <msg>`` and exit 1.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, NoReturn

import click

from proxy.config import is_loopback_host
from proxy.settings import parse_go_duration

if TYPE_CHECKING:
    import urllib.request

# urllib.request costs about 19 ms to import: only the subcommands that call
# an HTTP endpoint import it, not every start of the proxy.


def _fail(message: str) -> NoReturn:
    sys.stderr.write(f"Error: {message}\n")
    sys.exit(1)


@click.command("wait", help="Wait for another Proxy process to start")
@click.option(
    "-m", "--max", "max_wait", default="30s", help="maximum amount of time to wait for startup"
)
@click.option(
    "--http-address", default="localhost", help="Address for Prometheus and health check server."
)
@click.option("--http-port", default="9090", help="Port for Prometheus and health check server.")
@click.option("--quiet", is_flag=True, help="Log error messages only.")
def wait(max_wait: str, http_address: str, http_port: str, quiet: bool) -> None:
    try:
        limit = parse_go_duration(max_wait)
    except ValueError as exc:
        _fail(f'invalid argument "{max_wait}" for "-m, --max" flag: {exc}')
    import urllib.error

    url = f"http://{http_address}:{http_port}/startup"
    deadline = time.monotonic() + limit
    while True:
        try:
            with _opener(http_address).open(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() + 1 > deadline:
            _fail("command failed to complete successfully")
        time.sleep(1)


def _opener(host: str) -> urllib.request.OpenerDirector:
    """urllib's opener, without $http_proxy for loopback hosts (Go never proxies those)."""
    import urllib.request

    if is_loopback_host(host):
        return urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener()


@click.command("shutdown", help="Signal a running Proxy process to shut down")
@click.option("--admin-port", default="9091", help="port for the admin server")
def shutdown(admin_port: str) -> None:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{admin_port}/quitquitquit", method="POST")
    try:
        with _opener("127.0.0.1").open(request, timeout=10) as resp:
            status, body = resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as err:
        status, body = err.code, err.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as exc:
        _fail(f"failed to send shutdown request: {getattr(exc, 'reason', exc)}")
    if status != 200:
        _fail(f"shutdown request failed: status code {status}, {body}")


@click.command("completion", help="Generate the autocompletion script for the specified shell")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    from click.shell_completion import get_completion_class

    from proxy.cli import PROG, root

    cls = get_completion_class(shell)
    assert cls is not None
    click.echo(cls(root, {}, PROG, "_ALLOYDB_AUTH_PROXY_COMPLETE").source())


SUBCOMMANDS: dict[str, click.Command] = {
    "wait": wait,
    "shutdown": shutdown,
    "completion": completion,
}
