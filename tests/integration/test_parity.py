"""The parity table: the Go proxy 1.15's observable surface, one row per fact.

Every row runs the real CLI as a subprocess. Sections refer to the reference
the product was specified from (flags §1, env and config file §2, query
parameters §3, listeners §4, log lines §5, endpoints §7–8, exit codes §9,
bad-input messages §10, metrics §13). Many rows are also tested in depth
elsewhere; here they are listed together, so a missing row is visible.

Rows that cannot run here, and why:
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

import psycopg
import pytest

from proxy.fusemount import unsupported_reason as fuse_unsupported
from proxy.telemetry import missing_extra as telemetry_missing

from .conftest import DB_NAME, DB_PASSWORD, DB_USER, URI, http_get
from .proxyproc import ProxyProcess, free_port_block

NOT_COVERED = {
    "§14 ADC from the GCE metadata server on a real VM": "covered against a loopback fake "
    "metadata server in test_credentials.py",
    "§15 container image and Windows service": "not a Python wheel's concern",
}
__doc__ += "".join(f"\n  {k}: {v}" for k, v in NOT_COVERED.items())

SHORT = "project-id.us-central1.clust.inst"

# §1: every root flag, its short form, and a value to pass.
ROOT_FLAGS: list[tuple[str, str, str | None]] = [
    ("--address", "-a", "127.0.0.1"),
    ("--port", "-p", "5432"),
    ("--unix-socket", "-u", "/tmp"),
    ("--auto-iam-authn", "-i", None),
    ("--public-ip", "", None),
    ("--psc", "", None),
    ("--config-file", "", "x.toml"),
    ("--user-agent", "", "a/1"),
    ("--token", "-t", "tok"),
    ("--login-token", "", "tok"),
    ("--credentials-file", "-c", "key.json"),
    ("--json-credentials", "-j", "{}"),
    ("--gcloud-auth", "-g", None),
    ("--impersonate-service-account", "", "sa@p.iam.gserviceaccount.com"),
    ("--structured-logs", "-l", None),
    ("--debug-logs", "", None),
    ("--quiet", "", None),
    ("--max-connections", "", "10"),
    ("--min-sigterm-delay", "", "1s"),
    ("--max-sigterm-delay", "", "1s"),
    ("--alloydbadmin-api-endpoint", "", "https://alloydb.googleapis.com"),
    ("--fuse", "", "/mnt/x"),
    ("--fuse-tmp-dir", "", "/tmp/x"),
    ("--telemetry-project", "", "p"),
    ("--telemetry-prefix", "", "x"),
    ("--telemetry-sample-rate", "", "100"),
    ("--disable-traces", "", None),
    ("--disable-metrics", "", None),
    ("--prometheus", "", None),
    ("--prometheus-namespace", "", "ns"),
    ("--http-address", "", "127.0.0.1"),
    ("--http-port", "", "9090"),
    ("--health-check", "", None),
    ("--with-backend-check", "", None),
    ("--debug", "", None),
    ("--quitquitquit", "", None),
    ("--admin-port", "", "9091"),
    ("--run-connection-test", "", None),
    ("--lazy-refresh", "", None),
    ("--static-connection-info", "", "info.json"),
    ("--exit-zero-sigterm", "", None),
    ("--disable-built-in-telemetry", "", None),
]


def run_cli(*args: str, env: dict[str, str] | None = None) -> ProxyProcess:
    proc = ProxyProcess(list(args), env=env)
    proc.wait_exit()
    return proc


@pytest.mark.parametrize(
    ("flag", "short", "value"), ROOT_FLAGS, ids=[f"§1 {f}" for f, _, _ in ROOT_FLAGS]
)
def test_root_flag_parses(flag, short, value):
    """Only that each flag and its short form parse (what each does is tested
    elsewhere): --version is eager, it exits 0 once every flag before it has parsed."""
    for spelling in filter(None, (flag, short)):
        args = [spelling] + ([value] if value is not None else []) + ["--version"]
        proc = run_cli(*args)
        assert proc.proc.returncode == 0, (spelling, proc.output)
        assert proc.stdout[0].startswith("alloydb-auth-proxy version ")


def test_help_lists_every_root_flag_and_nothing_invented():
    proc = run_cli("--help")
    listed = set(re.findall(r"(--[a-z][a-z0-9-]+)", "\n".join(proc.stdout)))
    expected = {f for f, _, _ in ROOT_FLAGS} | {"--help", "--version"}
    assert expected <= listed
    for invented in ("--private-ip", "--auto-ip", "--exit-zero-on-sigterm", "--fd-rlimit"):
        assert invented not in listed


# §10 and §3: bad input → "Error: <msg>" + usage on stderr, exit 1.
BAD_COMMANDS: list[tuple[str, list[str], dict[str, str], str]] = [
    ("§10 no instance", [], {}, "missing instance uri (e.g., projects/$PROJECT/locations/"
     "$LOCATION/clusters/$CLUSTER/instances/$INSTANCE)"),
    ("§10 bad instance uri", ["projects/proj/locations/region/clusters/clust/"], {},
     'could not parse instance uri: "projects/proj/locations/region/clusters/clust/"'),
    ("§10 bad query", [URI + "?port=%zz"], {}, 'could not parse query: "port=%zz"'),
    ("§10 bad address", [URI, "--address", "bogus"], {}, 'not a valid IP address: "bogus"'),
    ("§10 token + credentials file", [URI, "-t", "x", "-c", "k.json"], {},
     "cannot specify --token and --credentials-file flags at the same time"),
    ("§10 token + gcloud", [URI, "-t", "x", "-g"], {},
     "cannot specify --token and --gcloud-auth flags at the same time"),
    ("§10 credentials file + gcloud", [URI, "-c", "k.json", "-g"], {},
     "cannot specify --credentials-file and --gcloud-auth flags at the same time"),
    ("§10 json + token", [URI, "-j", "{}", "-t", "x"], {},
     "cannot specify --json-credentials and --token flags at the same time"),
    ("§10 json + credentials file", [URI, "-j", "{}", "-c", "k.json"], {},
     "cannot specify --json-credentials and --credentials-file flags at the same time"),
    ("§10 json + gcloud", [URI, "-j", "{}", "-g"], {},
     "cannot specify --json-credentials and --gcloud-auth flags at the same time"),
    ("§10 unix socket + address", [URI, "-u", "/tmp", "-a", "127.0.0.1"], {},
     "cannot specify --unix-socket and --address together"),
    ("§10 unix socket + port", [URI, "-u", "/tmp", "-p", "5000"], {},
     "cannot specify --unix-socket and --port together"),
    ("§2 env counts as set for conflicts", [URI, "-u", "/tmp"], {"ALLOYDB_PROXY_PORT": "5000"},
     "cannot specify --unix-socket and --port together"),
    ("§10 unknown flag", [URI, "--foo"], {}, "unknown flag: --foo"),
    ("§10 bad duration", [URI, "--max-sigterm-delay", "10"], {},
     'invalid argument "10" for "--max-sigterm-delay" flag: time: missing unit in duration "10"'),
    ("§10 fuse with a connection test", ["--fuse", "/tmp", "--run-connection-test"], {},
     "cannot run connection tests in FUSE mode"),
    ("§3 query address not an IP", [URI + "?address=nope"], {},
     'address query param is not a valid IP address: "nope"'),
    ("§3 query empty address", [URI + "?address="], {},
     'address query param is not a valid IP address: ""'),
    ("§3 query port not an integer", [URI + "?port=x"], {},
     'port query param is not a valid integer: "x"'),
    ("§3 query bool", [URI + "?psc=maybe"], {},
     'psc query param should be true or false, got: "maybe"'),
    ("§3 query address twice", [URI + "?address=127.0.0.1&address=127.0.0.2"], {},
     'address query param should be only one value: ["127.0.0.1" "127.0.0.2"]'),
    ("§3 address + unix-socket", [URI + "?address=127.0.0.1&unix-socket=/tmp"], {},
     "cannot specify both address and unix-socket query params"),
    ("§3 port + unix-socket", [URI + "?port=5000&unix-socket=/tmp"], {},
     "cannot specify both port and unix-socket query params"),
    ("§3 address + unix-socket-path", [URI + "?address=127.0.0.1&unix-socket-path=/tmp/s"], {},
     "cannot specify both address and unix-socket-path query params"),
    ("§3 port + unix-socket-path", [URI + "?port=5000&unix-socket-path=/tmp/s"], {},
     "cannot specify both port and unix-socket-path query params"),
    ("§3 unix-socket-path + unix-socket", [URI + "?unix-socket-path=/tmp/s&unix-socket=/tmp"],
     {}, "cannot specify both unix-socket-path and unix-socket query params"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "env", "message"), [r[1:] for r in BAD_COMMANDS], ids=[r[0] for r in BAD_COMMANDS]
)
def test_bad_command(args, env, message):
    proc = run_cli(*args, env=env)
    assert proc.proc.returncode == 1
    err = "\n".join(proc.stderr)
    assert err.startswith(f"Error: {message}"), err[:400]
    assert "\nUsage:\n  alloydb-auth-proxy instance_uri... [flags]" in err


def query(port: int) -> int:
    with psycopg.connect(
        host="127.0.0.1", port=port, user=DB_USER, password=DB_PASSWORD, dbname=DB_NAME
    ) as conn:
        row = conn.execute("SELECT 42").fetchone()
        assert row is not None
        return int(row[0])


@pytest.fixture(params=["env", "toml", "yaml", "json"])
def configured_proxy(request, emulator, tmp_path):
    """One proxy configured only through ALLOYDB_PROXY_* or only through --config-file."""
    base = free_port_block(4)
    ports = {"proxy": base, "http": base + 1, "admin": base + 2}
    settings = {
        "instance-uri": URI,
        "port": str(ports["proxy"]),
        "token": "tok-app",
        "alloydbadmin-api-endpoint": emulator.admin_url,
        "health-check": "true",
        "prometheus": "true",
        "prometheus-namespace": "parity",
        "http-address": "127.0.0.1",
        "http-port": str(ports["http"]),
        "quitquitquit": "true",
        "debug": "true",
        "admin-port": str(ports["admin"]),
        "user-agent": "parity-agent/1.0",
        "telemetry-prefix": "tele/",  # without a project: the "Ignoring" line shows it was read
        "max-connections": "5",
    }
    if request.param == "env":
        env = {"ALLOYDB_PROXY_" + k.upper().replace("-", "_"): v for k, v in settings.items()}
        proc = ProxyProcess([], env=env)
    else:
        path = tmp_path / f"proxy.{request.param}"
        if request.param == "toml":
            path.write_text("".join(f'{k} = "{v}"\n' for k, v in settings.items()))
        elif request.param == "yaml":
            path.write_text("".join(f'{k}: "{v}"\n' for k, v in settings.items()))
        else:
            path.write_text(json.dumps(settings))
        proc = ProxyProcess(["--config-file", str(path)])
    with proc:
        proc.wait_ready()
        proc.wait_for("Enabling pprof endpoints")
        yield proc, ports


def refuses_the_sixth(proc, port: int) -> bool:
    """Six clients at once against --max-connections 5: the sixth is refused."""
    clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(6)]
    try:
        proc.wait_for(r"max connections \(5\) exceeded, refusing new connection")
        return clients[5].recv(1) == b""
    finally:
        for client in clients:
            client.close()


def test_settings_from_env_and_config_files(configured_proxy, emulator):
    proc, ports = configured_proxy
    http = f"http://127.0.0.1:{ports['http']}"
    admin = f"http://127.0.0.1:{ports['admin']}"
    rows = {
        "§5 listening line": f"[{SHORT}] Listening on 127.0.0.1:{ports['proxy']}" in proc.output,
        "§5 API endpoint line": f"Using API Endpoint {emulator.admin_url}" in proc.output,
        "§5 token line": "Authorizing with OAuth2 token" in proc.output,
        "§5 health server line": f"Starting health check server at 127.0.0.1:{ports['http']}"
        in proc.output,
        "§5 quitquitquit line": f"Enabling quitquitquit endpoint at localhost:{ports['admin']}"
        in proc.output,
        "§5 telemetry line": "Ignoring --telementry-prefix as --telemetry-project was not set"
        in proc.output,
        "§11 a query through the proxy": query(ports["proxy"]) == 42,
        "§7 /startup": http_get(f"{http}/startup") == (200, "ok"),
        "§7 /liveness": http_get(f"{http}/liveness") == (200, "ok"),
        "§7 /readiness": http_get(f"{http}/readiness") == (200, "ok"),
        "§7 unknown path": http_get(f"{http}/nope")[0] == 404,
        "§8 /debug/pprof/": http_get(f"{admin}/debug/pprof/")[0] == 200,
        "§8 quitquitquit rejects PUT": http_get(f"{admin}/quitquitquit", "PUT")[0] == 400,
        "§1 user agent": any(
            r.user_agent.endswith(" parity-agent/1.0") for r in emulator.admin_requests
        ),
        "§1 max-connections 5": refuses_the_sixth(proc, ports["proxy"]),
    }
    metrics = http_get(f"{http}/metrics")[1]
    for name in (
        "dial_latency_bucket",
        "dial_latency_sum",
        "dial_latency_count",
        "open_connections",
        "refresh_success_count",
        "bytes_sent",
        "bytes_received",
    ):
        rows[f"§13 metric parity_alloydbconn_{name}"] = f"parity_alloydbconn_{name}" in metrics
    rows["§13 labels"] = 'alloydb_instance="' in metrics and 'alloydb_dialer_id="' in metrics
    failed = [name for name, ok in rows.items() if not ok]
    assert not failed, f"rows failing: {failed}\n{proc.output}"
    # §9: /quitquitquit (GET) ends the proxy with exit code 0.
    assert http_get(f"{admin}/quitquitquit")[0] == 200
    assert proc.wait_exit() == 0


# §9: exit codes.
EXIT_CODES = [
    ("§9 SIGINT → 130", [], signal.SIGINT, 130),
    ("§9 SIGTERM → 143", [], signal.SIGTERM, 143),
    ("§9 --exit-zero-sigterm → 0", ["--exit-zero-sigterm"], signal.SIGTERM, 0),
]


@pytest.mark.parametrize(
    ("args", "sig", "code"), [r[1:] for r in EXIT_CODES], ids=[r[0] for r in EXIT_CODES]
)
def test_exit_codes(start_proxy, args, sig, code):
    proc = start_proxy(URI, "--port", str(free_port_block(1)), *args)
    assert proc.stop(sig) == code
    proc.wait_for(f"{signal.Signals(sig).name} signal received. Shutting down...")


def test_ready_line_is_exact(start_proxy):
    proc = start_proxy(URI, "--port", str(free_port_block(1)))
    line = next(x for x in proc.stdout if "ready for new connections" in x)
    assert re.fullmatch(
        r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d The proxy has started successfully and is ready "
        r"for new connections!",
        line,
    )


def test_env_config_file_variable_has_no_effect(tmp_path):
    # §2: ALLOYDB_PROXY_CONFIG_FILE is bound but ineffective in the Go proxy.
    path = tmp_path / "c.toml"
    path.write_text(f'instance-uri = "{URI}"\n')
    proc = run_cli(env={"ALLOYDB_PROXY_CONFIG_FILE": str(path)})
    assert proc.proc.returncode == 1
    assert "\n".join(proc.stderr).startswith("Error: missing instance uri")


def test_instance_uris_from_numbered_env_vars(emulator):
    base = free_port_block(2)
    other = URI.replace("/instances/inst", "/instances/other")
    emulator.add_instance(other)
    env = {
        "ALLOYDB_PROXY_INSTANCE_URI": URI,
        "ALLOYDB_PROXY_INSTANCE_URI_1": other,
        "ALLOYDB_PROXY_PORT": str(base),
        "ALLOYDB_PROXY_TOKEN": "tok-app",
        "ALLOYDB_PROXY_ALLOYDBADMIN_API_ENDPOINT": emulator.admin_url,
    }
    with ProxyProcess([], env=env) as proc:
        proc.wait_ready()
        # Each URI its own listener, in order: two URIs collapsing into one would fail.
        assert f"[{SHORT}] Listening on 127.0.0.1:{base}" in proc.output
        assert f"[{SHORT[: -len('inst')]}other] Listening on 127.0.0.1:{base + 1}" in proc.output


@pytest.mark.skipif(
    fuse_unsupported() is not None, reason=f"FUSE unavailable: {fuse_unsupported()}"
)
def test_fuse_mount_as_go_serves_it(emulator):
    """§4 --fuse: no instance argument needed, sockets under $TMPDIR/alloydb-tmp by
    default (created), a README, a lookup answers a symlink to TMP/<name> holding a
    0777 .s.PGSQL.5432, readdir lists README and the active names; SIGTERM → 143."""
    top = Path(tempfile.mkdtemp(prefix="fp", dir="/tmp"))  # socket paths are short
    mnt = top / "m"
    mnt.mkdir()
    env = {"TMPDIR": str(top), "ALLOYDB_PROXY_TOKEN": "tok-app"}
    args = ["--fuse", str(mnt), "--alloydbadmin-api-endpoint", emulator.admin_url]
    try:
        with ProxyProcess(args, env=env) as proc:
            proc.wait_ready()
            assert os.listdir(mnt) == ["README"]
            assert os.readlink(mnt / SHORT) == str(top / "alloydb-tmp" / SHORT)
            socket_file = top / "alloydb-tmp" / SHORT / ".s.PGSQL.5432"
            assert stat.S_IMODE(os.stat(socket_file).st_mode) == 0o777
            assert sorted(os.listdir(mnt)) == ["README", SHORT]
            dsn = f"host={mnt / SHORT} user={DB_USER} password={DB_PASSWORD} dbname={DB_NAME}"
            with psycopg.connect(dsn) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
            assert proc.stop(signal.SIGTERM) == 143
    finally:
        subprocess.run(["fusermount", "-uz", str(mnt)], capture_output=True, check=False)
        shutil.rmtree(top, ignore_errors=True)


def test_telemetry_flags_without_a_project_log_the_go_lines(start_proxy):
    """§5: the three "Ignoring" lines, with the Go proxy's "telementry" typo."""
    proc = start_proxy(
        URI, "--port", str(free_port_block(1)), "--telemetry-prefix", "p",
        "--disable-metrics", "--disable-traces",
    )  # fmt: skip
    for flag in ("--telementry-prefix", "--disable-metrics", "--disable-traces"):
        assert f"Ignoring {flag} as --telemetry-project was not set" in proc.output


@pytest.mark.skipif(telemetry_missing() is not None, reason=str(telemetry_missing()))
def test_telemetry_export_names_as_go(start_proxy, tmp_path):
    """§13: with --telemetry-project, metric types custom.googleapis.com/opencensus/
    alloydbconn/<view> in the project, spans named cloud.google.com/go/alloydbconn.*."""
    from .telemetry_fake import TelemetryFake

    fake = TelemetryFake(tmp_path)
    try:
        port = free_port_block(1)
        proc = start_proxy(
            URI, "--port", str(port), "--telemetry-project", "proj", "--telemetry-sample-rate",
            "1", "--telemetry-api-endpoint", fake.endpoint, env=fake.env(),
        )  # fmt: skip
        with psycopg.connect(
            f"host=127.0.0.1 port={port} user={DB_USER} password={DB_PASSWORD} dbname={DB_NAME}"
        ) as conn:
            conn.execute("SELECT 1")
        assert proc.stop() == 143  # the last export happens at exit
        types = {p.type for p in fake.points}
        assert "custom.googleapis.com/opencensus/alloydbconn/dial_latency" in types
        assert "custom.googleapis.com/opencensus/alloydbconn/open_connections" in types
        assert "cloud.google.com/go/alloydbconn.Dial" in {s.name for s in fake.spans}
        assert {p.project for p in fake.points} == {"projects/proj"}
    finally:
        fake.stop()
