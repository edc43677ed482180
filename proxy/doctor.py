"""``alloydb-auth-proxy doctor``: walk the path to an AlloyDB login once, in order.

For each instance: credentials -> Admin API -> address -> network -> TLS ->
metadata exchange -> database login. Each check passes, fails, warns or is
skipped (when one it depends on failed); a failure says how to fix it. No
listener is opened, and no token, key or password is ever printed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import json
import os
import secrets
import socket
import struct
import sys
from base64 import b64decode, b64encode
from dataclasses import asdict, dataclass
from typing import Any

from proxy import mdx, tlsconn, workers
from proxy.adminapi import AdminAPIClient, InstanceAddresses
from proxy.config import IP_PSC, IP_PUBLIC, Config, InstanceConfig
from proxy.credentials import CredentialSet
from proxy.dataplane import plane
from proxy.errors import AdminAPIError, AdminAPIUnreachable, ProxyError

CHECKS = ("credentials", "admin_api", "address", "network", "tls", "metadata_exchange", "login")
NETWORK_TIMEOUT = 10.0
PORT = 5433
ROLES = "roles/alloydb.client and roles/serviceusage.serviceUsageConsumer"
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy")


@dataclass
class Check:
    instance: str
    check: str
    status: str  # pass | fail | warn | skip
    detail: str
    fix: str = ""


class _Failed(Exception):
    def __init__(self, detail: str, fix: str = "") -> None:
        super().__init__(detail)
        self.detail, self.fix = detail, fix


@dataclass
class Options:
    db_user: str = ""
    db_name: str = "postgres"
    password: str = ""  # from PGPASSWORD; never printed


async def diagnose(cfg: Config, options: Options) -> list[Check]:
    results: list[Check] = []
    creds = await _credentials(cfg, results)
    for inst in cfg.instances:
        await _instance(cfg, inst, creds, options, results)
    return results


def _record(results: list[Check], instance: str, check: str, status: str, detail: str,
            fix: str = "") -> None:  # fmt: skip
    results.append(Check(instance, check, status, detail, fix))


async def _credentials(cfg: Config, results: list[Check]) -> CredentialSet | None:
    from proxy.supervisor import resolve_credentials

    try:
        creds = await workers.TOKENS.run(lambda: resolve_credentials(cfg))
        await creds.api.token()
        if any(cfg.auto_iam_for(i) for i in cfg.instances):
            await creds.login.token()
    except ProxyError as exc:
        _record(results, "", "credentials", "fail", str(exc), _credentials_fix(str(exc)))
        return None
    except Exception as exc:  # google-auth's own errors: name them, do not crash
        text = f"{type(exc).__name__}: {exc}"
        _record(results, "", "credentials", "fail", text, _credentials_fix(text))
        return None
    who = _principal(cfg)
    detail = f"{creds.description}; a token was obtained" + (f"; principal {who}" if who else "")
    _record(results, "", "credentials", "pass", detail)
    return creds


def _principal(cfg: Config) -> str:
    """The principal's email where the configuration says it (never a secret)."""
    if cfg.impersonate_service_account:
        return cfg.impersonate_service_account.split(",")[0].strip()
    info: Any = None
    try:
        if cfg.credentials_file:
            with open(cfg.credentials_file, encoding="utf-8") as fh:
                info = json.load(fh)
        elif cfg.json_credentials:
            info = json.loads(cfg.json_credentials)
        elif os.environ.get("GOOGLE_APPLICATION_CREDENTIALS") and not (
            cfg.token or cfg.gcloud_auth
        ):
            with open(os.environ["GOOGLE_APPLICATION_CREDENTIALS"], encoding="utf-8") as fh:
                info = json.load(fh)
    except (OSError, ValueError):
        return ""
    if not isinstance(info, dict):
        return ""
    if isinstance(info.get("client_email"), str):
        return str(info["client_email"])
    url = info.get("service_account_impersonation_url")
    if isinstance(url, str) and "serviceAccounts/" in url:
        return url.split("serviceAccounts/", 1)[1].split(":", 1)[0]
    return ""


def _credentials_fix(text: str) -> str:
    lowered = text.lower()
    if "401" in lowered and ("169.254.169.254" in lowered or "imds" in lowered or "aws" in lowered):
        return (
            "the instance requires IMDSv2: recreate the workload identity configuration with "
            "--enable-imdsv2 (it adds imdsv2_session_token_url to the credential file)"
        )
    if "sts" in lowered or "token exchange" in lowered:
        return "check the workload identity pool provider and its attribute conditions"
    return (
        "give credentials with --credentials-file, --token, --json-credentials or "
        "--gcloud-auth, or set GOOGLE_APPLICATION_CREDENTIALS"
    )


async def _instance(cfg: Config, inst: InstanceConfig, creds: CredentialSet | None,
                    options: Options, results: list[Check]) -> None:  # fmt: skip
    name = inst.uri.name
    remaining = list(CHECKS[1:])

    def skip_rest(reason: str) -> None:
        for check in remaining:
            _record(results, name, check, "skip", reason)

    if creds is None:
        skip_rest("no credentials")
        return
    from proxy.supervisor import user_agent

    client = AdminAPIClient(cfg.api_endpoint, creds.api, user_agent(cfg))
    state: dict[str, Any] = {"cfg": cfg, "inst": inst, "creds": creds, "client": client,
                             "options": options}  # fmt: skip
    try:
        steps = (
            ("admin_api", _admin_api),
            ("address", _address),
            ("network", _network),
            ("tls", _tls),
            ("metadata_exchange", _metadata_exchange),
            ("login", _login),
        )
        for check, step in steps:
            remaining.remove(check)
            try:
                status, detail = await step(state)
            except _Failed as exc:
                _record(results, name, check, "fail", exc.detail, exc.fix)
                skip_rest(f"{check} failed")
                return
            except Exception as exc:  # anything unforeseen fails this check, not the report
                _record(results, name, check, "fail", f"{type(exc).__name__}: {exc}")
                skip_rest(f"{check} failed")
                return
            _record(results, name, check, status, detail)
    finally:
        for key in ("conn", "sock"):
            held = state.get(key)
            if held is not None:
                held.close()
        client.close()


async def _admin_api(state: dict[str, Any]) -> tuple[str, str]:
    cfg, inst, client = state["cfg"], state["inst"], state["client"]
    try:
        addresses: InstanceAddresses = await client.connection_info(inst.uri)
    except AdminAPIError as exc:
        if exc.status == 403:
            raise _Failed(str(exc), f"grant the principal {ROLES} on project "
                          f"{inst.uri.project!r}") from None  # fmt: skip
        if exc.status == 401:
            raise _Failed(str(exc), "the token was refused: it is invalid or expired. A --token "
                          "is never refreshed: give a fresh one, or a credential source that "
                          "refreshes (--credentials-file, --gcloud-auth, ADC)") from None  # fmt: skip
        if exc.status == 404:
            raise _Failed(str(exc), "the instance URI is wrong: check project, region, cluster "
                          "and instance names (gcloud alloydb instances list)") from None  # fmt: skip
        raise _Failed(str(exc)) from None
    except AdminAPIUnreachable as exc:
        proxies = ", ".join(
            f"{v}={_without_userinfo(os.environ[v])}" for v in PROXY_VARIABLES if os.environ.get(v)
        )
        raise _Failed(
            str(exc),
            f"the Admin API at {cfg.api_endpoint} is not reachable from here"
            + (
                f" (proxy settings in effect: {proxies})"
                if proxies
                else " (no proxy variables set)"
            ),
        ) from None
    state["addresses"] = addresses
    kinds = ", ".join(sorted(addresses.as_map())) or "none"
    return "pass", f"connectionInfo answered; address types: {kinds}"


async def _address(state: dict[str, Any]) -> tuple[str, str]:
    cfg, inst, addresses = state["cfg"], state["inst"], state["addresses"]
    wanted = cfg.ip_type_for(inst)
    found = addresses.as_map()
    address = found.get(wanted)
    if not address:
        flags = {"PRIVATE": "neither --public-ip nor --psc", "PUBLIC": "--public-ip",
                 "PSC": "--psc"}  # fmt: skip
        have = ", ".join(f"{k} (use {flags[k]})" for k in sorted(found)) or "none"
        raise _Failed(f'instance does not have IP of type "{wanted}"; it has: {have}',
                      f"use the flag for an address type it has, or enable {wanted} on the "
                      "instance")  # fmt: skip
    state["address"] = address
    if wanted == IP_PSC:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(address, PORT, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise _Failed(f"PSC DNS name {address} does not resolve: {exc}",
                          "create a DNS record for the PSC endpoint's address in a zone "
                          "this host resolves") from None  # fmt: skip
        resolved = sorted({str(info[4][0]) for info in infos})
        return "pass", f"PSC {address} resolves to {', '.join(resolved)}"
    return "pass", f"{'public' if wanted == IP_PUBLIC else 'private'} IP {address}"


async def _network(state: dict[str, Any]) -> tuple[str, str]:
    address = state["address"]
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(address, PORT, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise _Failed(f"{address} does not resolve: {exc}",
                      "check this host's DNS for the instance's name") from None  # fmt: skip
    failure: _Failed | None = None
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        state["sock"] = sock  # closed by _instance whatever happens
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, sockaddr), NETWORK_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as exc:  # (distinct on Python 3.10)
            failure = _connect_failure(address, exc)
            sock.close()
            del state["sock"]
            continue
        return "pass", f"TCP to {address}:{PORT} connected"
    raise failure or _Failed(f"{address}: no address to connect to")


def _connect_failure(address: str, exc: Exception) -> _Failed:
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return _Failed(f"TCP to {address}:{PORT} timed out after {NETWORK_TIMEOUT:g} s",
                      "a firewall or the VPC routing drops the packets: allow egress to port "
                      "5433 and check that this host's network reaches the instance's")  # fmt: skip
    if isinstance(exc, ConnectionRefusedError):
        return _Failed(f"TCP to {address}:{PORT} was refused",
                       "something answers at that address but nothing listens on 5433: is it "
                       "the instance's address, and is the instance running?")  # fmt: skip
    return _Failed(f"TCP to {address}:{PORT}: {getattr(exc, 'strerror', None) or exc}",
                   "check the route from this host to the instance's network")  # fmt: skip


async def _tls(state: dict[str, Any]) -> tuple[str, str]:
    from cryptography import x509

    from proxy.keys import KeyPair

    client, inst, address = state["client"], state["inst"], state["address"]
    keys = await workers.TOKENS.run(KeyPair.generate)
    try:
        cert = await client.client_certificate(inst.uri, keys.public_pem)
    except (AdminAPIError, AdminAPIUnreachable) as exc:
        raise _Failed(f"generateClientCertificate: {exc}",
                      f"the principal needs {ROLES}") from None  # fmt: skip
    context = plane.TLSClientContext(
        "".join(cert.chain_pem).encode(), keys.private_pem, cert.ca_pem.encode()
    )
    conn = plane.TLSConnection(context, state.pop("sock").detach(), address)
    state["conn"] = conn
    try:
        await tlsconn.handshake(conn, timeout=NETWORK_TIMEOUT)
    except (plane.TLSError, OSError, TimeoutError, asyncio.TimeoutError) as exc:
        if "certificate verify failed" in str(exc):
            fix = ("the server's certificate does not match the address dialled or the "
                   "cluster's CA; with --psc, dial the PSC DNS name, not an IP")  # fmt: skip
        elif isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
            fix = "the server accepted TCP but did not answer TLS: is this an AlloyDB instance?"
        else:
            fix = "the server ended the handshake: is this an AlloyDB instance's port 5433?"
        raise _Failed(f"TLS handshake: {exc or type(exc).__name__}", fix) from None
    peer = x509.load_der_x509_certificate(conn.peer_certificate_der)
    expires = peer.not_valid_after_utc
    left = expires - dt.datetime.now(dt.timezone.utc)
    kind = "IP SAN" if _is_ip(address) else "DNS SAN"
    detail = (f"{conn.version}, {conn.cipher}; server identity {address} checked ({kind}); "
              f"server certificate valid until {expires:%Y-%m-%d %H:%M} UTC")  # fmt: skip
    if left < dt.timedelta(days=7):
        return "warn", detail + " (less than 7 days left)"
    return "pass", detail


async def _metadata_exchange(state: dict[str, Any]) -> tuple[str, str]:
    from proxy.dialer import MDX_USER_AGENT

    cfg, inst, creds, conn = state["cfg"], state["inst"], state["creds"], state["conn"]
    auto_iam = cfg.auto_iam_for(inst)
    token = await creds.login.token()
    request = mdx.MdxRequest(
        user_agent=MDX_USER_AGENT,
        auth_type=mdx.AUTO_IAM if auto_iam else mdx.DB_NATIVE,
        oauth2_token=token.value,
    )
    try:
        await tlsconn.send_all(conn, mdx.encode_request(request), timeout=NETWORK_TIMEOUT)
        header = await tlsconn.recv_exactly(conn, mdx.HEADER_SIZE, timeout=NETWORK_TIMEOUT)
        size = mdx.body_length(header)
        body = await tlsconn.recv_exactly(conn, size, timeout=NETWORK_TIMEOUT) if size else b""
        response = mdx.decode_response(body)
    except (TimeoutError, asyncio.TimeoutError):
        raise _Failed(f"no answer to the metadata exchange in {NETWORK_TIMEOUT:g} s",
                      "the instance is overloaded or restarting: try again") from None  # fmt: skip
    except (plane.TLSError, ConnectionError) as exc:
        raise _Failed(f"the server ended the exchange: {exc}",
                      "under TLS 1.3 a refused client certificate shows only here; else the "
                      "instance closed the connection (restarting?)") from None  # fmt: skip
    except mdx.MdxDecodeError as exc:
        raise _Failed(f"the server's answer is not a metadata exchange reply: {exc}",
                      "is this an AlloyDB instance's port 5433?") from None  # fmt: skip
    if not response.ok:
        fix = f"the principal needs {ROLES}"
        if auto_iam:
            fix += "; for AUTO_IAM the login token needs the alloydb.login scope"
        raise _Failed(f"server says: {response.error or 'metadata exchange failed'}", fix)
    mode = "AUTO_IAM" if auto_iam else "DB_NATIVE"
    return "pass", f"OK ({mode})"


async def _login(state: dict[str, Any]) -> tuple[str, str]:
    options: Options = state["options"]
    conn = state["conn"]
    auto_iam = state["cfg"].auto_iam_for(state["inst"])
    if not options.db_user:
        return "skip", "give --db-user (and PGPASSWORD for a database user) to try a login"
    user = options.db_user
    if user.endswith(".gserviceaccount.com"):
        raise _Failed(f"database user {user!r} is a service account's full email",
                      f"use {user[: -len('.gserviceaccount.com')]!r}: IAM database users of "
                      "service accounts end in .iam")  # fmt: skip
    try:
        current = await _pg_login(conn, user, options.db_name, options.password, auto_iam)
    except _Failed:
        raise
    except (ConnectionError, TimeoutError, plane.TLSError) as exc:
        raise _Failed(f"the connection ended during login: {exc}") from None
    return "pass", f"logged in as {current!r} to database {options.db_name!r}"


# ---------------------------------------------------------------- PostgreSQL


async def _pg_login(conn: Any, user: str, dbname: str, password: str, auto_iam: bool) -> str:
    params = b"user\0" + user.encode() + b"\0database\0" + dbname.encode() + b"\0\0"
    await _send(conn, struct.pack("!II", 8 + len(params), 196608) + params)
    scram: _Scram | None = None
    while True:
        kind, body = await _message(conn)
        if kind == b"E":
            raise _Failed(*_login_error(_error_fields(body), user, auto_iam))
        if kind == b"R":
            (code,) = struct.unpack("!I", body[:4])
            if code == 0:
                if scram is not None and not scram.verified:
                    raise _Failed("the server accepted the login without proving it knows the "
                                  "password (SCRAM): not the expected server")  # fmt: skip
                continue
            if not password:
                raise _Failed(f"the server asks {user!r} for a password",
                              "set PGPASSWORD, or use an IAM user with --auto-iam-authn")  # fmt: skip
            if code == 3:
                await _send_password(conn, password.encode() + b"\0")
            elif code == 5:
                inner = hashlib.md5(password.encode() + user.encode()).hexdigest().encode()
                digest = hashlib.md5(inner + body[4:8]).hexdigest()
                await _send_password(conn, b"md5" + digest.encode() + b"\0")
            elif code == 10:
                mechanisms = body[4:].split(b"\0")
                if b"SCRAM-SHA-256" not in mechanisms:
                    raise _Failed(f"the server offers only {mechanisms!r} (SASL)")
                scram = _Scram(password)
                first = scram.first()
                mech = b"SCRAM-SHA-256\0"
                await _send(conn, b"p" + struct.pack("!I", 4 + len(mech) + 4 + len(first))
                            + mech + struct.pack("!I", len(first)) + first)  # fmt: skip
            elif code == 11 and scram is not None:
                final = scram.final(body[4:])
                await _send(conn, b"p" + struct.pack("!I", 4 + len(final)) + final)
            elif code == 12 and scram is not None:
                scram.verify(body[4:])
            else:
                raise _Failed(f"unsupported authentication request {code}")
        elif kind == b"Z":
            break
    query = b"SELECT current_user\0"
    await _send(conn, b"Q" + struct.pack("!I", 4 + len(query)) + query)
    current = ""
    while True:
        kind, body = await _message(conn)
        if kind == b"D":
            (length,) = struct.unpack("!i", body[2:6])
            current = body[6 : 6 + length].decode("utf-8", "replace")
        elif kind == b"E":
            raise _Failed(*_login_error(_error_fields(body), user, auto_iam))
        elif kind == b"Z":
            await _send(conn, b"X\0\0\0\4")
            return current


async def _send_password(conn: Any, payload: bytes) -> None:
    await _send(conn, b"p" + struct.pack("!I", 4 + len(payload)) + payload)


async def _send(conn: Any, data: bytes) -> None:
    await tlsconn.send_all(conn, data, timeout=NETWORK_TIMEOUT)


async def _message(conn: Any) -> tuple[bytes, bytes]:
    head = await tlsconn.recv_exactly(conn, 5, timeout=NETWORK_TIMEOUT)
    (length,) = struct.unpack("!I", head[1:])
    if not 4 <= length <= 1 << 20:
        raise _Failed(f"the server sent a message of length {length}: not PostgreSQL")
    body = await tlsconn.recv_exactly(conn, length - 4, timeout=NETWORK_TIMEOUT)
    return head[:1], body


def _error_fields(body: bytes) -> dict[str, str]:
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return fields


def _login_error(fields: dict[str, str], user: str, auto_iam: bool) -> tuple[str, str]:
    message = fields.get("M", "login failed")
    code = fields.get("C", "")
    unknown_role = code == "28000" and "role" in message and "does not exist" in message
    iam_user = "@" in user
    # Under AUTO_IAM the server answers an IAM user it does not know with a
    # password-authentication failure: the user is missing, not a password.
    auth_failed = "authentication failed" in message  # AlloyDB: "IAM authentication failed"
    if iam_user and (unknown_role or (auto_iam and auth_failed)):
        return message, (f'create the IAM database user if it does not exist: gcloud alloydb '
                         f'users create "{user}" --cluster=… --region=… --type=IAM_BASED; '
                         "it must be named after the principal whose token is used")  # fmt: skip
    if unknown_role:
        return (
            message,
            f'create the database user "{user}" (CREATE USER, or gcloud alloydb users create)',
        )
    if "pg_hba" in message:
        return message, "the server does not accept this user from here (its pg_hba rules)"
    if code in ("28P01", "28000"):
        return message, "check the user name and PGPASSWORD, or use --auto-iam-authn for IAM users"
    return message, ""


class _Scram:
    """SCRAM-SHA-256 (RFC 5802/7677), client side, without channel binding."""

    def __init__(self, password: str) -> None:
        self.password = password.encode()
        self.nonce = b64encode(secrets.token_bytes(18)).decode()
        self.first_bare = f"n=,r={self.nonce}"
        self.expected = ""
        self.verified = False

    def first(self) -> bytes:
        return ("n,," + self.first_bare).encode()

    def final(self, server_first: bytes) -> bytes:
        attrs = _scram_attrs(server_first)
        if not {"r", "s", "i"} <= set(attrs) or not attrs["i"].isdigit():
            raise _Failed("the server's SCRAM message is malformed")
        if not attrs["r"].startswith(self.nonce):
            raise _Failed("the server's SCRAM nonce does not extend ours")
        salted = hashlib.pbkdf2_hmac(
            "sha256", self.password, b64decode(attrs["s"]), int(attrs["i"])
        )
        client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        stored = hashlib.sha256(client_key).digest()
        without_proof = f"c=biws,r={attrs['r']}"
        message = f"{self.first_bare},{server_first.decode()},{without_proof}".encode()
        signature = hmac.new(stored, message, hashlib.sha256).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
        self.expected = b64encode(hmac.new(server_key, message, hashlib.sha256).digest()).decode()
        return f"{without_proof},p={b64encode(proof).decode()}".encode()

    def verify(self, server_final: bytes) -> None:
        attrs = _scram_attrs(server_final)
        if not hmac.compare_digest(attrs.get("v", ""), self.expected):
            raise _Failed("the server's SCRAM signature is wrong: not the expected server")
        self.verified = True


def _without_userinfo(url: str) -> str:
    """A proxy URL without its user:password@ (never printed)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    host = rest.rsplit("@", 1)[1] if "@" in rest.split("/", 1)[0] else rest
    return f"{scheme}{sep}{host}"


def _scram_attrs(message: bytes) -> dict[str, str]:
    text = message.decode("utf-8", "replace")
    return dict(part.split("=", 1) for part in text.split(",") if "=" in part)


def _is_ip(name: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------- output


def render_json(results: list[Check]) -> str:
    ok = all(c.status in ("pass", "warn", "skip") for c in results) and not any(
        c.status == "fail" for c in results
    )
    return json.dumps({"ok": ok, "checks": [asdict(c) for c in results]}, indent=2)


def render_text(results: list[Check], colour: bool) -> str:
    marks = {"pass": ("ok  ", "32"), "fail": ("FAIL", "31"), "warn": ("warn", "33"),
             "skip": ("skip", "90")}  # fmt: skip
    lines = []
    last = None
    for c in results:
        if c.instance != last:
            lines.append(c.instance or "(all instances)")
            last = c.instance
        mark, code = marks[c.status]
        shown = f"\033[{code}m{mark}\033[0m" if colour else mark
        lines.append(f"  {shown}  {c.check:<18} {c.detail}")
        if c.fix:
            lines.append(f"        {'':<18} fix: {c.fix}")
    return "\n".join(lines)


def exit_code(results: list[Check]) -> int:
    return 1 if any(c.status == "fail" for c in results) else 0


def main(cfg: Config, options: Options, fmt: str) -> int:
    from proxy import dataplane
    from proxy.eventloop import run_until_complete

    if dataplane.ERROR:
        print(f"Error: {dataplane.ERROR}", file=sys.stderr)
        return 1

    results = run_until_complete(lambda: diagnose(cfg, options))
    if fmt == "json":
        print(render_json(results))
    else:
        print(render_text(results, colour=sys.stdout.isatty()))
    return exit_code(results)
