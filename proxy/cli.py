"""The ``alloydb-auth-proxy`` command line: flags, validation and exit codes.

Flag names, short forms, defaults and error strings follow the Go proxy
1.15, so existing scripts keep working. Validation errors print
``Error: <msg>`` and the usage to stderr and exit 1 (cobra's behaviour, where
click alone would exit 2); runtime failures are logged once as
``The proxy has encountered a terminal error: <err>`` and exit 1.
No network access happens here: the supervisor does that.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import click

from proxy import GO_PROXY_VERSION, __version__
from proxy.config import DEFAULT_API_ENDPOINT, Config, is_loopback_host, parse_instance_arg
from proxy.errors import BadCommandError
from proxy.log import configure
from proxy.settings import (
    env_name,
    load_config_file,
    overlay,
    parse_go_bool,
    parse_go_duration,
)

PROG = "alloydb-auth-proxy"
SHORT_HELP = "alloydb-auth-proxy provides a secure way to authorize connections to AlloyDB."
RELOADABLE = (
    "a reload reads only the instance-uri, instance-uri-1, ... keys of --config-file: "
    "list the instances there to change them without a restart"
)
MISSING_INSTANCE = (
    "missing instance uri (e.g., projects/$PROJECT/locations/$LOCATION/"
    "clusters/$CLUSTER/instances/$INSTANCE)"
)


def _usage() -> str:
    ctx = click.Context(root, **root.context_settings)  # -h too, whatever ran first
    lines = ["Usage:", f"  {PROG} instance_uri... [flags]", "", "Flags:"]
    for param in root.get_params(ctx):
        record = param.get_help_record(ctx)
        if record:
            lines.append(f"  {record[0]:<44} {record[1]}")
    return "\n".join(lines) + "\n"


def fail(message: str) -> NoReturn:
    """Cobra-style bad-command exit: the message, then the usage, exit 1."""
    sys.stderr.write(f"Error: {message}\n{_usage()}\n")
    sys.exit(1)


if TYPE_CHECKING:
    from proxy.reload import ConfigSource

    _FloatParamType = click.ParamType[float]
else:  # ParamType is generic only from click 8.5 on
    _FloatParamType = click.ParamType


class GoDuration(_FloatParamType):
    """A Go duration (``10s``, ``1m30s``) as seconds, with pflag's error text."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, float):
            return value
        try:
            return parse_go_duration(str(value))
        except ValueError as exc:
            flag = f"--{param.name.replace('_', '-')}" if param and param.name else "duration"
            raise click.UsageError(f'invalid argument "{value}" for "{flag}" flag: {exc}') from None


def _version_callback(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        from proxy import dataplane

        click.echo(f"{PROG} version {__version__} (compatible with {GO_PROXY_VERSION})")
        click.echo(f"data plane: {dataplane.describe()}")
        ctx.exit(0)


class _CobraStyleCommand(click.Command):
    def main(  # type: ignore[override]
        self, args: list[str] | None = None, prog_name: str | None = None, **extra: Any
    ) -> Any:
        try:
            return super().main(args, prog_name, standalone_mode=False, **extra)
        except click.exceptions.NoSuchOption as exc:
            fail(f"unknown flag: {exc.option_name}")
        except click.UsageError as exc:
            fail(exc.format_message())
        except click.exceptions.Abort as exc:
            # Ctrl-C before the proxy's own handlers are in place: SIGINT's code.
            cause = exc.__cause__ or exc.__context__
            sys.exit(130 if isinstance(cause, KeyboardInterrupt) else 1)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)


@click.command(
    PROG,
    cls=_CobraStyleCommand,
    help=SHORT_HELP,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.argument("instances", nargs=-1)
@click.option(
    "-a",
    "--address",
    default="127.0.0.1",
    help="(*) Address on which to bind AlloyDB instance listeners.",
)
@click.option(
    "-p",
    "--port",
    type=int,
    default=5432,
    help="(*) Initial port to use for listeners. Subsequent listeners increment from this value.",
)
@click.option(
    "-u",
    "--unix-socket",
    default="",
    help="(*) Enables Unix sockets for all listeners using the provided directory.",
)
@click.option(
    "-i",
    "--auto-iam-authn",
    is_flag=True,
    help="(*) Enables Automatic IAM Authentication for all instances.",
)
@click.option(
    "--public-ip", is_flag=True, help="(*) Connect to the public ip address for all instances."
)
@click.option("--psc", is_flag=True, help="(*) Connect to the PSC endpoint for all instances.")
@click.option(
    "-t",
    "--token",
    default="",
    help="Bearer token used for authorization. Flag values are visible to local users in the process list; ALLOYDB_PROXY_TOKEN is not.",
)
@click.option(
    "--login-token",
    default="",
    help="Bearer token used as a separate credential for IAM database authentication login. Only used when --auto-iam-authn is enabled. Prefer ALLOYDB_PROXY_LOGIN_TOKEN: flag values are visible in the process list.",
)
@click.option(
    "-c",
    "--credentials-file",
    default="",
    help="Path to a service account key to use for authentication.",
)
@click.option(
    "-j",
    "--json-credentials",
    default="",
    help="Use service account key JSON as a source of IAM credentials. Flag values are visible in the process list: prefer --credentials-file.",
)
@click.option(
    "-g",
    "--gcloud-auth",
    is_flag=True,
    help="Use gcloud's user credentials as a source of IAM credentials.",
)
@click.option(
    "--impersonate-service-account",
    default="",
    help="Comma separated list of service accounts to impersonate. The first value is the target account.",
)
@click.option(
    "--alloydbadmin-api-endpoint",
    default=DEFAULT_API_ENDPOINT,
    help="When set, the proxy uses this host as the base API path.",
)
@click.option(
    "--user-agent",
    default="",
    help="Space separated list of additional user agents, e.g. custom-agent/0.0.1",
)
@click.option(
    "--lazy-refresh",
    is_flag=True,
    help="Retrieve connection info lazily and on-demand instead of refreshing it in the background.",
)
@click.option(
    "--max-connections",
    type=click.IntRange(min=0),
    default=0,
    help="Limits the number of connections by refusing any additional connections. 0 means no limit.",
)
@click.option(
    "--data-plane-threads",
    type=click.IntRange(min=0, max=64),
    default=0,
    help="(Not in the Go proxy.) Threads that move the bytes of the native data plane, for the whole process; 0 means one per usable CPU, up to 16.",
)
@click.option(
    "-l",
    "--structured-logs",
    is_flag=True,
    help="Enable structured logs using the LogEntry format.",
)
@click.option("--debug-logs", is_flag=True, help="Enable debug logging.")
@click.option("--quiet", is_flag=True, help="Log error messages only.")
@click.option(
    "--http-address",
    default="localhost",
    help="Address for Prometheus and health check server.",
)
@click.option("--http-port", default="9090", help="Port for Prometheus and health check server.")
@click.option(
    "--health-check",
    is_flag=True,
    help="Enables health check endpoints /startup, /liveness, and /readiness on localhost.",
)
@click.option("--admin-port", default="9091", help="Port for localhost-only admin server.")
@click.option(
    "--quitquitquit",
    is_flag=True,
    help="Enable quitquitquit endpoint on the localhost admin server.",
)
@click.option(
    "--min-sigterm-delay",
    type=GoDuration(),
    default="0s",
    help="The number of seconds to accept new connections after receiving a TERM signal.",
)
@click.option(
    "--max-sigterm-delay",
    type=GoDuration(),
    default="0s",
    help="Maximum amount of time to wait after for any open connections to close after receiving a TERM signal.",
)
@click.option(
    "--exit-zero-sigterm",
    is_flag=True,
    help="Exit with 0 exit code when Sigterm received (default is 143)",
)
@click.option(
    "--run-connection-test",
    is_flag=True,
    help="Runs a connection test against all specified instances. If an instance is unreachable, the Proxy exits with a failure status code.",
)
@click.option(
    "--prometheus", is_flag=True, help="Enable Prometheus HTTP endpoint /metrics on localhost"
)
@click.option(
    "--prometheus-namespace", default="", help="Use the provided Prometheus namespace for metrics"
)
@click.option(
    "--with-backend-check",
    is_flag=True,
    help="Adds a backend dial check to the startup probe: /startup also dials every instance.",
)
@click.option(
    "--debug",
    is_flag=True,
    help="Enable the profiling endpoints under /debug/pprof/ on the localhost admin server.",
)
@click.option(
    "--static-connection-info",
    default="",
    help="JSON file with static connection info for instances (development only).",
)
@click.option(
    "--telemetry-project",
    default="",
    help="Enable Cloud Monitoring and Cloud Trace integration with the provided project ID (needs the [telemetry] extra).",
)
@click.option("--telemetry-prefix", default="", help="Prefix to use for Cloud Monitoring metrics.")
@click.option(
    "--telemetry-sample-rate",
    type=int,
    default=10000,
    help="Configure the denominator of the probabilistic sample rate of traces sent to Cloud Trace.",
)
@click.option(
    "--disable-traces",
    is_flag=True,
    help="Disable Cloud Trace integration (used with telemetry-project)",
)
@click.option(
    "--disable-metrics",
    is_flag=True,
    help="Disable Cloud Monitoring integration (used with telemetry-project)",
)
@click.option(
    "--telemetry-api-endpoint",
    default="",
    help="(Not in the Go proxy.) host:port of a gRPC endpoint that serves both Cloud Monitoring and Cloud Trace (e.g. a Private Service Connect endpoint), instead of Google's.",
)
@click.option(
    "--disable-built-in-telemetry",
    is_flag=True,
    help="Disables the internal metric reporter (this proxy has none).",
)
@click.option(
    "--fuse",
    default="",
    help="Mount a directory at the path using FUSE to access AlloyDB instances.",
)
@click.option(
    "--fuse-tmp-dir",
    default="",
    help="Temp dir for Unix sockets created with FUSE (default $TMPDIR/alloydb-tmp)",
)
@click.option(
    "--config-file",
    default="",
    help="Path to a TOML, YAML or JSON file containing configuration options.",
)
@click.option(
    "-v",
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_version_callback,
    help=f"Print the {PROG} version",
)
@click.pass_context
def root(ctx: click.Context, /, instances: tuple[str, ...], **opts: Any) -> None:
    start_opts = dict(opts)  # config_from adds the env and file values to opts
    try:
        cfg, warnings = config_from(ctx, instances, opts)
    except BadCommandError as exc:
        fail(str(exc))

    def read_again() -> tuple[Config, list[str]]:
        # A reload reads the same sources: these arguments, this environment,
        # the config file as it is now. Instances from the first two cannot change.
        if instances:
            raise BadCommandError(f"the instances are given on the command line; {RELOADABLE}")
        variable = env_name("instance-uri")  # what settings.overlay reads, with _0, _1, ...
        if os.environ.get(variable) or os.environ.get(f"{variable}_0"):
            raise BadCommandError(f"the instances come from {variable}*; {RELOADABLE}")
        return config_from(ctx, instances, dict(start_opts))

    sys.exit(run(cfg, warnings, read_again))


def config_from(
    ctx: click.Context, instances: tuple[str, ...], opts: dict[str, Any]
) -> tuple[Config, list[str]]:
    """The Config of a parsed command line, with ALLOYDB_PROXY_* and the config file."""
    cli_set = {
        name
        for name in opts
        if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)
    }
    file_values = load_config_file(opts["config_file"]) if opts["config_file"] else {}
    extra = overlay(
        _unset_option_converters(ctx, cli_set),
        environ=os.environ,
        file_values=file_values,
        file_path=opts["config_file"],
    )
    opts.update({name.replace("-", "_"): value for name, value in extra.values.items()})
    set_options = frozenset(cli_set | {n.replace("-", "_") for n in extra.values})
    given = instances or tuple(extra.instances)
    cfg = build_config(given, opts, set_options)
    warnings = list(extra.warnings)
    if cfg.fuse and given:
        warnings.append(
            "Ignoring the instance arguments: with --fuse, instances are opened by name"
        )
    return cfg, warnings


def _unset_option_converters(
    ctx: click.Context, cli_set: set[str]
) -> dict[str, Callable[[str], Any]]:
    """For each option not given on the command line: how to read it from a string."""

    def converter(param: click.Option) -> Callable[[str], Any]:
        if param.is_flag:
            return parse_go_bool

        def convert(raw: str) -> Any:
            try:
                return param.type.convert(raw, param, ctx)
            except click.BadParameter as exc:
                raise ValueError(exc.format_message()) from None

        return convert

    return {
        param.name.replace("_", "-"): converter(param)
        for param in root.params
        if isinstance(param, click.Option)
        and param.name
        and param.name not in cli_set
        and param.name not in ("version", "config_file", "help")
    }


def build_config(
    instances: tuple[str, ...], opts: dict[str, Any], set_options: frozenset[str]
) -> Config:
    """Validate flags in the Go proxy's order and build the Config (pure)."""
    if not instances and not opts["fuse"]:
        raise BadCommandError(MISSING_INSTANCE)
    if opts["fuse"]:
        if opts["run_connection_test"]:
            raise BadCommandError("cannot run connection tests in FUSE mode")
        from proxy.fusemount import unsupported_reason  # imports the binding: only with --fuse

        reason = unsupported_reason()
        if reason:
            raise BadCommandError(f"--fuse is not supported: {reason}")
    parsed = tuple(parse_instance_arg(arg) for arg in instances)  # checked even under --fuse
    if opts["fuse"]:
        parsed = ()  # as in Go: the mount serves instances by name, the arguments are unused
    try:
        ipaddress.ip_address(opts["address"])
    except ValueError:
        raise BadCommandError(f'not a valid IP address: "{opts["address"]}"') from None

    exclusive = [
        (
            "token",
            "credentials_file",
            "cannot specify --token and --credentials-file flags at the same time",
        ),
        ("token", "gcloud_auth", "cannot specify --token and --gcloud-auth flags at the same time"),
        (
            "credentials_file",
            "gcloud_auth",
            "cannot specify --credentials-file and --gcloud-auth flags at the same time",
        ),
        (
            "json_credentials",
            "token",
            "cannot specify --json-credentials and --token flags at the same time",
        ),
        (
            "json_credentials",
            "credentials_file",
            "cannot specify --json-credentials and --credentials-file flags at the same time",
        ),
        (
            "json_credentials",
            "gcloud_auth",
            "cannot specify --json-credentials and --gcloud-auth flags at the same time",
        ),
    ]
    for first, second, message in exclusive:
        if opts[first] and opts[second]:
            raise BadCommandError(message)
    if opts["unix_socket"] and "address" in set_options:
        raise BadCommandError("cannot specify --unix-socket and --address together")
    if opts["unix_socket"] and "port" in set_options:
        raise BadCommandError("cannot specify --unix-socket and --port together")

    endpoint = opts["alloydbadmin_api_endpoint"]
    if "alloydbadmin_api_endpoint" in set_options:
        endpoint = endpoint.rstrip("/")
    return Config(
        instances=parsed,
        address=opts["address"],
        port=opts["port"],
        unix_socket=opts["unix_socket"],
        auto_iam_authn=opts["auto_iam_authn"],
        public_ip=opts["public_ip"],
        psc=opts["psc"],
        token=opts["token"],
        login_token=opts["login_token"],
        credentials_file=opts["credentials_file"],
        json_credentials=opts["json_credentials"],
        gcloud_auth=opts["gcloud_auth"],
        impersonate_service_account=opts["impersonate_service_account"],
        api_endpoint=endpoint,
        user_agent=opts["user_agent"],
        lazy_refresh=opts["lazy_refresh"],
        max_connections=opts["max_connections"],
        data_plane_threads=opts["data_plane_threads"],
        structured_logs=opts["structured_logs"],
        debug_logs=opts["debug_logs"],
        quiet=opts["quiet"],
        http_address=opts["http_address"],
        http_port=opts["http_port"],
        health_check=opts["health_check"],
        admin_port=opts["admin_port"],
        quitquitquit=opts["quitquitquit"],
        min_sigterm_delay=opts["min_sigterm_delay"],
        max_sigterm_delay=opts["max_sigterm_delay"],
        exit_zero_sigterm=opts["exit_zero_sigterm"],
        run_connection_test=opts["run_connection_test"],
        prometheus=opts["prometheus"],
        prometheus_namespace=opts["prometheus_namespace"],
        debug=opts["debug"],
        with_backend_check=opts["with_backend_check"],
        static_connection_info=opts["static_connection_info"],
        telemetry_project=opts["telemetry_project"],
        telemetry_prefix=opts["telemetry_prefix"],
        telemetry_sample_rate=opts["telemetry_sample_rate"],
        disable_traces=opts["disable_traces"],
        disable_metrics=opts["disable_metrics"],
        disable_built_in_telemetry=opts["disable_built_in_telemetry"],
        telemetry_api_endpoint=opts["telemetry_api_endpoint"],
        fuse=opts["fuse"],
        fuse_tmp_dir=opts["fuse_tmp_dir"],
        set_options=set_options,
    )


def _cleartext_remote(endpoint: str) -> bool:
    import urllib.parse

    parts = urllib.parse.urlsplit(endpoint)
    return parts.scheme.lower() == "http" and not is_loopback_host(parts.hostname or "")


def run(
    cfg: Config,
    warnings: list[str] | tuple[str, ...] = (),
    reload_source: ConfigSource | None = None,
) -> int:
    """Run the proxy until it stops; returns the process exit code."""
    log = configure(structured=cfg.structured_logs, quiet=cfg.quiet, debug=cfg.debug_logs)
    for warning in warnings:
        log.error(warning)
    from proxy import dataplane

    if dataplane.ERROR:
        log.error("The proxy has encountered a terminal error: %s", dataplane.ERROR)
        return 1
    log.debug("Data plane: %s", dataplane.describe())
    if "alloydbadmin_api_endpoint" in cfg.set_options:
        log.info("Using API Endpoint %s", cfg.api_endpoint)
        if _cleartext_remote(cfg.api_endpoint):
            log.error(
                "Warning: the Admin API endpoint %s is plain http:// and not loopback: "
                "OAuth2 tokens and client certificates will cross the network unencrypted",
                cfg.api_endpoint,
            )
    if "http_port" in cfg.set_options and not (cfg.health_check or cfg.prometheus):
        log.info("Ignoring --http-port because --prometheus or --health-check was not set")
    if not cfg.telemetry_project:
        # The Go proxy's lines, "telementry" typo included.
        for option, flag in (
            ("telemetry_prefix", "--telementry-prefix"),
            ("disable_metrics", "--disable-metrics"),
            ("disable_traces", "--disable-traces"),
        ):
            if option in cfg.set_options:
                log.info("Ignoring %s as --telemetry-project was not set", flag)
    elif not (cfg.disable_metrics and cfg.disable_traces):
        from proxy.telemetry import missing_extra, prefix_problem

        problem = missing_extra() or (
            None if cfg.disable_metrics else prefix_problem(cfg.telemetry_prefix)
        )
        if problem:
            log.error("The proxy has encountered a terminal error: %s", problem)
            return 1
    if cfg.login_token and not any(cfg.auto_iam_for(i) for i in cfg.instances):
        log.info(
            "Ignoring --login-token because --auto-iam-authn is not enabled (globally or per-instance)"
        )

    from proxy.keys import generate_in_background

    # From here the key thread imports while this one does: a KeyboardInterrupt
    # raised inside an import then could leave the two deadlocked on the import
    # locks (seen under load: Ctrl-C at start-up hung the process). Ctrl-C is
    # noted instead, and the Supervisor acts on it once its own handlers are in.
    early: list[signal.Signals] = []
    signal.signal(signal.SIGINT, lambda number, _frame: early.append(signal.Signals(number)))
    keys = generate_in_background()  # overlaps the imports below (see proxy/keys.py)

    from proxy.eventloop import run_until_complete
    from proxy.rlimits import raise_open_file_limit
    from proxy.supervisor import Supervisor

    raise_open_file_limit(log)
    outcome = run_until_complete(
        lambda: Supervisor(cfg, log, keys, reload_source, early_signals=early).run()
    )
    if outcome.error:
        log.error("The proxy has encountered a terminal error: %s", outcome.error)
    return int(outcome.code)


def _doctor(
    ctx: click.Context,
    /,
    instances: tuple[str, ...],
    db_user: str,
    db_name: str,
    output_format: str,
    **opts: Any,
) -> None:
    try:
        cfg, warnings = config_from(ctx, instances, opts)
    except BadCommandError as exc:
        fail(str(exc))
    if cfg.fuse:
        fail("doctor checks the instances given as arguments: run it without --fuse")
    from proxy import doctor

    for warning in warnings:  # e.g. an ALLOYDB_PROXY_* value that is ignored
        sys.stderr.write(warning + "\n")
    configure(structured=False, quiet=True, debug=False)  # the report is the output
    options = doctor.Options(db_user, db_name, os.environ.get("PGPASSWORD", ""))
    sys.exit(doctor.main(cfg, options, output_format))


def doctor_command() -> click.Command:
    """``doctor``: the proxy's own options (not --version) plus three of its own."""
    params = [p for p in root.params if p.name != "version"] + [
        click.Option(["--db-user"], default="", help="Try a database login as this user."),
        click.Option(["--db-name"], default="postgres", help="Database for the login."),
        click.Option(
            ["--format", "output_format"],
            type=click.Choice(["text", "json"]),
            default="text",
            help="text (a table) or json (one object).",
        ),
    ]
    return _CobraStyleCommand(
        "doctor",
        params=params,
        context_settings={"help_option_names": ["-h", "--help"]},
        callback=click.pass_context(_doctor),
        help="Check each link from this host to an AlloyDB login, and say how to fix the first broken one.",
    )


def main() -> None:
    # The root command takes free positional instance URIs, so subcommands are
    # picked out by their first word before click sees the arguments.
    from proxy.subcommands import SUBCOMMANDS

    args = sys.argv[1:]
    if args and args[0] == "doctor":
        doctor_command().main(args[1:], prog_name=f"{PROG} doctor")
    elif args and args[0] in SUBCOMMANDS:
        SUBCOMMANDS[args[0]].main(args[1:], prog_name=f"{PROG} {args[0]}")
    elif args and args[0] == "help":
        root.main(["--help"], prog_name=PROG)
    else:
        root.main(args, prog_name=PROG)
