"""The proxy's configuration: frozen dataclasses and pure parsing/validation.

Instance URIs and their query parameters follow the Go proxy (1.15) exactly,
including its error strings, because users' scripts depend on them. Nothing
here touches the network or the file system.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, replace
from urllib.parse import parse_qs

from proxy.errors import BadCommandError

# Unanchored like Go's FindSubmatch: surrounding text is tolerated.
_URI_RE = re.compile(r"projects/([^:]+(?::[^:]+)?)/locations/(.+)/clusters/(.+)/instances/(.+)")

DEFAULT_API_ENDPOINT = "https://alloydb.googleapis.com"
SERVER_PROXY_PORT = 5433
UNIX_SOCKET_NAME = ".s.PGSQL.5432"

IP_PRIVATE = "PRIVATE"
IP_PUBLIC = "PUBLIC"
IP_PSC = "PSC"


def is_loopback_host(host: str) -> bool:
    """Whether a host name or address (IPv6 in brackets or not) always means this machine."""
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class InstanceURI:
    """A parsed ``projects/P/locations/R/clusters/C/instances/I`` name."""

    project: str
    region: str
    cluster: str
    instance: str

    @property
    def name(self) -> str:
        return (
            f"projects/{self.project}/locations/{self.region}"
            f"/clusters/{self.cluster}/instances/{self.instance}"
        )

    @property
    def cluster_name(self) -> str:
        return f"projects/{self.project}/locations/{self.region}/clusters/{self.cluster}"

    @property
    def short(self) -> str:
        """``project.region.cluster.instance``, the Go proxy's name in logs and errors."""
        return f"{self.project}.{self.region}.{self.cluster}.{self.instance}"

    @property
    def socket_dir_name(self) -> str:
        """Directory name for unix sockets: lower-cased, ``:`` of legacy projects as ``_``."""
        return self.short.lower().replace(":", "_")


def parse_instance_uri(text: str) -> InstanceURI:
    match = _URI_RE.search(text)
    if match is None:
        raise BadCommandError(f'could not parse instance uri: "{text}"')
    return InstanceURI(*match.groups())


@dataclass(frozen=True)
class InstanceConfig:
    """One instance URI with its per-instance ``?query`` overrides (None = not set)."""

    uri: InstanceURI
    address: str | None = None
    port: int | None = None
    unix_socket: str | None = None
    unix_socket_path: str | None = None
    auto_iam_authn: bool | None = None
    public_ip: bool | None = None
    psc: bool | None = None


def _parse_bool_param(name: str, values: list[str]) -> bool:
    if len(values) != 1:
        raise BadCommandError(f"{name} param should be only one value: {_go_quote_list(values)}")
    value = values[0].lower()
    if value in ("true", "t", ""):
        return True
    if value in ("false", "f"):
        return False
    raise BadCommandError(f'{name} query param should be true or false, got: "{values[0]}"')


def _go_quote_list(values: list[str]) -> str:
    """Go's ``%q`` of a []string: ``["a" "b"]``."""
    return "[" + " ".join(f'"{v}"' for v in values) + "]"


#: The instance-URI query parameters (``URI?port=6000&psc``), for the docs;
#: parse_instance_arg reads exactly these keys and ignores others, as Go does.
QUERY_PARAMETERS: dict[str, str] = {
    "address": "IP literal: TCP bind address for this instance",
    "port": "integer: fixed TCP port for this instance (does not consume the --port counter)",
    "unix-socket": "directory: a Unix socket at <dir>/<short name>/.s.PGSQL.5432",
    "unix-socket-path": "path: the exact Unix socket (.s.PGSQL.5432 appended if missing)",
    "auto-iam-authn": "bool: Automatic IAM Authentication (in effect for every instance)",
    "public-ip": "bool: dial the instance's public IP",
    "psc": "bool: dial the instance's PSC DNS name (wins over public-ip)",
}


def parse_instance_arg(arg: str) -> InstanceConfig:
    """Parse one positional instance argument, ``URI[?query]``."""
    uri_text, sep, query = arg.partition("?")
    uri = parse_instance_uri(uri_text)
    if not sep:
        return InstanceConfig(uri=uri)
    # Go's url.ParseQuery rejects semicolons and bad %-escapes; a key without
    # "=" is fine and means an empty value (so "?psc" turns PSC on).
    if ";" in query or not _valid_percent_encoding(query):
        raise BadCommandError(f'could not parse query: "{query}"')
    params = parse_qs(query, keep_blank_values=True)

    cfg = InstanceConfig(uri=uri)
    if "address" in params:
        values = params["address"]
        if len(values) != 1:
            raise BadCommandError(
                f"address query param should be only one value: {_go_quote_list(values)}"
            )
        if not _is_ip(values[0]):
            raise BadCommandError(f'address query param is not a valid IP address: "{values[0]}"')
        cfg = replace(cfg, address=values[0])
    if "port" in params:
        values = params["port"]
        if len(values) != 1:
            # The Go proxy prints the address values here (a bug); we print the real ones.
            raise BadCommandError(
                f"port query param should be only one value: {_go_quote_list(values)}"
            )
        try:
            port = int(values[0])
        except ValueError:
            raise BadCommandError(
                f'port query param is not a valid integer: "{values[0]}"'
            ) from None
        if not 0 <= port <= 65535:
            raise BadCommandError(f'port query param is not a valid port: "{values[0]}"')
        cfg = replace(cfg, port=port or None)  # port=0 means unset, as in Go
    if "unix-socket" in params:
        values = params["unix-socket"]
        if len(values) != 1:
            raise BadCommandError(
                f"unix query param should be only one value: {_go_quote_list(values)}"
            )
        cfg = replace(cfg, unix_socket=values[0])
    if "unix-socket-path" in params:
        values = params["unix-socket-path"]
        if len(values) != 1:
            raise BadCommandError(
                f"unix-socket-path query param should be only one value: {_go_quote_list(values)}"
            )
        cfg = replace(cfg, unix_socket_path=values[0])
    if "auto-iam-authn" in params:
        cfg = replace(
            cfg, auto_iam_authn=_parse_bool_param("auto-iam-authn", params["auto-iam-authn"])
        )
    if "public-ip" in params:
        cfg = replace(cfg, public_ip=_parse_bool_param("public-ip", params["public-ip"]))
    if "psc" in params:
        cfg = replace(cfg, psc=_parse_bool_param("psc", params["psc"]))

    if cfg.address is not None and cfg.unix_socket is not None:
        raise BadCommandError("cannot specify both address and unix-socket query params")
    if cfg.port is not None and cfg.unix_socket is not None:
        raise BadCommandError("cannot specify both port and unix-socket query params")
    if cfg.address is not None and cfg.unix_socket_path is not None:
        raise BadCommandError("cannot specify both address and unix-socket-path query params")
    if cfg.port is not None and cfg.unix_socket_path is not None:
        raise BadCommandError("cannot specify both port and unix-socket-path query params")
    if cfg.unix_socket_path is not None and cfg.unix_socket is not None:
        raise BadCommandError("cannot specify both unix-socket-path and unix-socket query params")
    return cfg


def _valid_percent_encoding(query: str) -> bool:
    return re.search(r"%(?![0-9A-Fa-f]{2})", query) is None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Config:
    """Everything the running proxy needs, after flags, env and file are merged."""

    instances: tuple[InstanceConfig, ...] = ()
    address: str = "127.0.0.1"
    port: int = 5432
    unix_socket: str = ""
    auto_iam_authn: bool = False
    public_ip: bool = False
    psc: bool = False

    token: str = ""
    login_token: str = ""
    credentials_file: str = ""
    json_credentials: str = ""
    gcloud_auth: bool = False
    impersonate_service_account: str = ""

    api_endpoint: str = DEFAULT_API_ENDPOINT
    user_agent: str = ""
    lazy_refresh: bool = False
    max_connections: int = 0
    data_plane_threads: int = 0  # 0: plane.default_threads()

    structured_logs: bool = False
    debug_logs: bool = False
    quiet: bool = False

    http_address: str = "localhost"
    http_port: str = "9090"
    health_check: bool = False
    admin_port: str = "9091"
    quitquitquit: bool = False
    min_sigterm_delay: float = 0.0  # seconds
    max_sigterm_delay: float = 0.0
    exit_zero_sigterm: bool = False
    run_connection_test: bool = False
    prometheus: bool = False
    prometheus_namespace: str = ""
    debug: bool = False
    with_backend_check: bool = False
    static_connection_info: str = ""
    telemetry_project: str = ""
    telemetry_prefix: str = ""
    telemetry_sample_rate: int = 10000
    disable_traces: bool = False
    disable_metrics: bool = False
    disable_built_in_telemetry: bool = False
    telemetry_api_endpoint: str = ""  # "" = Google's endpoints (proxy/telemetry.py)
    fuse: str = ""  # a directory: instances are served by name (proxy/fusemount.py)
    fuse_tmp_dir: str = ""  # "" = $TMPDIR/alloydb-tmp

    # Which options the user set explicitly (flag, env or file), for the
    # "Ignoring ..." logs and conflict checks that the Go proxy does.
    set_options: frozenset[str] = field(default_factory=frozenset)

    def auto_iam_for(self, inst: InstanceConfig) -> bool:
        # Go passes WithIAMAuthN to the whole dialer when any instance asks for
        # it, so AUTO_IAM is effectively global; we keep that observable behaviour.
        return self.auto_iam_authn or any(i.auto_iam_authn for i in self.instances)

    def ip_type_for(self, inst: InstanceConfig) -> str:
        public = self.public_ip if inst.public_ip is None else inst.public_ip
        psc = self.psc if inst.psc is None else inst.psc
        if psc:  # applied last in Go, so PSC wins over public
            return IP_PSC
        if public:
            return IP_PUBLIC
        return IP_PRIVATE


@dataclass(frozen=True)
class TCPMount:
    address: str
    port: int


@dataclass(frozen=True)
class UnixMount:
    directory: str  # created if missing (mode 0777); its parent must exist
    path: str  # the socket file: directory + "/.s.PGSQL.5432"


def plan_mounts(cfg: Config) -> list[tuple[InstanceConfig, TCPMount | UnixMount]]:
    """Decide each instance's listener, incrementing ports as the Go proxy does.

    TCP is used when no unix socket is configured for the instance (globally or
    per instance), or when the instance sets ``address`` or ``port``. Explicit
    ``?port=`` does not consume a number from the counter.
    """
    import os.path

    next_port = cfg.port
    plan: list[tuple[InstanceConfig, TCPMount | UnixMount]] = []
    for inst in cfg.instances:
        wants_unix = bool(cfg.unix_socket or inst.unix_socket or inst.unix_socket_path)
        if not wants_unix or inst.address is not None or inst.port is not None:
            address = inst.address or cfg.address
            if inst.port is not None:
                port = inst.port
            else:
                port = next_port
                # Port 0 asks the OS for an ephemeral port for every listener.
                if next_port:
                    next_port += 1
            plan.append((inst, TCPMount(address, port)))
            continue
        if inst.unix_socket_path:
            path = inst.unix_socket_path
            if os.path.basename(path) == UNIX_SOCKET_NAME:
                path = os.path.dirname(path)
            plan.append((inst, UnixMount(path, os.path.join(path, UNIX_SOCKET_NAME))))
            continue
        base = inst.unix_socket or cfg.unix_socket
        directory = os.path.join(base, inst.uri.socket_dir_name)
        plan.append((inst, UnixMount(directory, os.path.join(directory, UNIX_SOCKET_NAME))))
    return plan
